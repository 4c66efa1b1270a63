"""tiny-flash over gloo ranks started by the launcher: tensor parallel, expert parallel and both give the
one-process logits, and each rank reads only its pieces (its experts, its TP rows and columns). Expert parallel
without tensor parallel is data-parallel attention (each rank runs its own rows; the MoE gathers them all), and so
is TP2 x DP2 over 4 ranks, whose groups run batches of different sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.model_runtime import load_model
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.make_checkpoint import write_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("tp-ep")
    ckpt = write_checkpoint(root / "ckpt", "tiny-flash", quantized=True, seed=0)
    ids = torch.randint(2, 129280, (3, 12), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    model = load_model(ckpt)
    states = [model.new_state() for _ in range(3)]
    prefill = model.prefill(ids[:, :-1], states)
    return Path(ckpt), root / "ids.pt", {"prefill": prefill, "step": model.decode(ids[:, -1], states)}


@pytest.mark.parametrize("mode", ["tp", "ep", "tp+ep"])
def test_two_ranks_equal_one_process(setup, model_ranks, tmp_path, mode):
    ckpt, ids, want = setup
    layout = {"tp": "2,1", "ep": "1,2", "tp+ep": "2,2"}[mode]
    ranks = model_ranks(ckpt, layout, ids, tmp_path / "out", 2)
    cfg = ModelConfig.from_file(ckpt / "config.json")
    for r, got in enumerate(ranks):
        rows = got["rows"]
        assert rows == ([r, r + 2][: 2 - r] if mode == "ep" else [0, 1, 2])
        torch.testing.assert_close(got["prefill"], want["prefill"][rows], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got["step"], want["step"][rows], atol=2e-5, rtol=1e-5)
        pieces = got["pieces"]
        experts = {int(n.split(".experts.")[1].split(".")[0]) for n in pieces if ".experts." in n}
        half = cfg.n_routed_experts // 2
        if "ep" in mode:
            assert experts == set(range(r * half, (r + 1) * half))
            assert all(pieces[n] == (None, 0, 0) for n in pieces if ".experts." in n)  # owned experts whole
            skipped = {int(n.split(".experts.")[1].split(".")[0]) for n in got["skipped"] if ".experts." in n}
            assert skipped == set(range(cfg.n_routed_experts)) - experts
        else:
            assert experts == set(range(cfg.n_routed_experts))
            rows = cfg.moe_intermediate_size // 2
            if mode == "tp":  # no expert parallelism: every expert's intermediate rows are split
                assert pieces["layers.2.ffn.experts.3.w1.weight"] == (0, r * rows, (r + 1) * rows)
                assert pieces["layers.2.ffn.experts.3.w2.weight"] == (1, r * rows, (r + 1) * rows)
        shared = [n for n in pieces if ".shared_experts." in n]
        if mode == "ep":
            assert bool(shared) == (r == 0)  # rank 0 alone holds (and adds) the shared expert
        wq_b = [n for n in pieces if n.endswith("attn.wq_b.weight") and ".indexer." not in n]
        if "tp" in mode:
            rows = cfg.num_attention_heads * cfg.head_dim // 2
            assert len(wq_b) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
            assert all(pieces[n] == (0, r * rows, (r + 1) * rows) for n in wq_b)
            assert pieces["embed.weight"] == (0, r * cfg.vocab_size // 2, (r + 1) * cfg.vocab_size // 2)
            assert pieces["layers.1.attn.wo_b.weight"][0] == 1
        else:
            assert all(pieces[n] == (None, 0, 0) for n in wq_b)
        assert got["fingerprint_lines"] == ranks[0]["fingerprint_lines"]  # layout-independent


def test_tp2_dp2_groups_run_their_own_rows(setup, model_ranks, tmp_path):
    """TP2 x DP2 with experts over all 4 ranks: group 0 runs rows 0 and 2, group 1 row 1, and every rank's logits
    are the one-process logits of its rows; each rank holds a quarter of the experts and half of the heads."""
    ckpt, ids, want = setup
    ranks = model_ranks(ckpt, "2,4", ids, tmp_path / "out", 4)
    cfg = ModelConfig.from_file(ckpt / "config.json")
    quarter, heads = cfg.n_routed_experts // 4, cfg.num_attention_heads * cfg.head_dim // 2
    for r, got in enumerate(ranks):
        assert got["rows"] == [[0, 2], [1]][r // 2]
        torch.testing.assert_close(got["prefill"], want["prefill"][got["rows"]], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got["step"], want["step"][got["rows"]], atol=2e-5, rtol=1e-5)
        pieces = got["pieces"]
        experts = {int(n.split(".experts.")[1].split(".")[0]) for n in pieces if ".experts." in n}
        assert experts == set(range(r * quarter, (r + 1) * quarter))
        t = r % 2
        assert pieces["layers.0.attn.wq_b.weight"] == (0, t * heads, (t + 1) * heads)
