"""2-process gloo runs with TP=2, EP=2 and both give the single-process logits; each rank reads only its shard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime import load_model
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.make_checkpoint import write_checkpoint

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("tp_ep_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("tp-ep")
    ckpt = write_checkpoint(root / "ckpt", "tiny-flash", quantized=True, seed=0)
    ids = torch.randint(2, 129280, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    model = load_model(ckpt)
    full = model(ids)
    states = [model.new_state() for _ in range(2)]
    model.prefill(ids[:, :-1], states)
    return Path(ckpt), root / "ids.pt", {"full": full, "step": model.decode(ids[:, -1], states)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(ckpt: Path, ids: Path, mode: str, out: Path) -> list[dict]:
    out.mkdir()
    base = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    base.pop("DSV4_KERNEL_BACKEND", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(ckpt), mode, str(ids), str(out)],
            env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("mode", ["tp", "ep", "tp+ep"])
def test_two_ranks_equal_one_process(setup, tmp_path, mode):
    ckpt, ids, want = setup
    ranks = _run(ckpt, ids, mode, tmp_path / "out")
    cfg = ModelConfig.from_file(ckpt / "config.json")
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["full"], want["full"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got["step"], want["step"], atol=2e-5, rtol=1e-5)
        experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in got["read"] if ".experts." in n}
        half = cfg.n_routed_experts // 2
        if "ep" in mode:
            assert experts_read == set(range(r * half, (r + 1) * half))
            skipped_routed = {int(n.split(".experts.")[1].split(".")[0]) for n in got["skipped"] if ".experts." in n}
            assert skipped_routed == set(range(cfg.n_routed_experts)) - experts_read
            assert all(".experts." in n or ".shared_experts." in n for n in got["skipped"])
            assert any(".shared_experts." in n for n in got["read"]) == (r == 0)  # rank 0 alone runs it
        else:
            assert experts_read == set(range(cfg.n_routed_experts)) and not got["skipped"]
        wq_b = [n for n in got["sliced"] if n.endswith("attn.wq_b.weight")]
        if "tp" in mode:
            rows = cfg.num_attention_heads * cfg.head_dim // 2
            assert len(wq_b) == cfg.num_hidden_layers
            assert all(got["sliced"][n] == (0, r * rows, (r + 1) * rows) for n in wq_b)
            assert not any(n.endswith(("attn.wq_b.weight", "attn.wo_b.weight")) for n in got["read"])
        else:
            assert not got["sliced"]
