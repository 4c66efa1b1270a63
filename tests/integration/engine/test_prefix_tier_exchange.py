"""A prefix one prefill worker computed and published to the Redis tier, imported by a worker in another process,
continues exactly like a prefix computed locally (greedy and seeded), and that worker computes only the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.services.local_redis import LocalRedis

pytestmark = pytest.mark.integration

PEER = Path(__file__).with_name("prefix_peer.py")
sys.path.insert(0, str(PEER.parent))
import prefix_peer  # noqa: E402  (the subprocess script: its prompts and specs)


def _run(mode: str, ckpt: Path, redis_url: str, out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(PEER), mode, str(ckpt), redis_url, str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{mode} peer failed:\n{proc.stderr[-3000:]}"


def test_a_prefix_published_by_one_process_continues_exactly_in_another(
    tmp_path: Path, redis_server: LocalRedis
) -> None:
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    _run("publish", ckpt, redis_server.url, tmp_path)
    published = json.loads((tmp_path / "published.json").read_text())
    assert published["tier"]["prefixes"] >= 1 and published["tier"]["bytes"] > 0
    _run("import", ckpt, redis_server.url, tmp_path)
    got = json.loads((tmp_path / "imported.json").read_text())
    assert got["imported"] == len(prefix_peer.PREFIX)
    local = LLMEngine.from_path(ckpt, dtype=torch.float64, config=EngineConfig(prefix_cache=False))
    for name, spec in prefix_peer.SPECS.items():
        want = local.generate_ids([prefix_peer.PROMPT_B], SamplingParams.from_spec(spec))[0].token_ids
        assert got[name]["tokens"] == want, name
    # only the tokens past the imported prefix are computed (the second request resumes at least as far)
    assert got["greedy"]["computed"] == len(prefix_peer.PROMPT_B) - len(prefix_peer.PREFIX)
    assert got["seeded"]["computed"] <= got["greedy"]["computed"]
