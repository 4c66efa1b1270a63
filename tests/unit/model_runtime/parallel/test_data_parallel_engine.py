"""Data-parallel attention in the group engine: TP2 x DP2 with the experts over all 4 ranks (tiny-flash, float64,
4 gloo ranks through the real launcher). The leader schedules both groups' pools; each group runs its own
sequences' attention and the MoE runs over both groups' tokens.

- greedy tokens equal a one-process engine's, for prompts whose prefill chunks and decode steps fall into one
  group or both (a group without rows in a call takes part in the MoE's exchange with none), and for prompts
  that resume from prefix-cache entries of either group, or from a prefix imported into the group's cache;
- sequences run side by side are shared out between the groups;
- KV state crosses layouts both ways: one-process exports continue in whichever group imports them, and states
  prefilled in either group (the other group's state reaches the leader through the step channel) continue in a
  one-process engine.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.weights import load_model

from ..engine.test_mtp_handoff import _check_drafts
from .conftest import run_engine_ranks
from .engine_rank import CONFIG, GREEDY, continue_import, one_process_engine, prefill_export, random_tokens

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """One TP2 x DP2 x EP4 group run; returns (the work, the leader's results, the checkpoint)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dp-engine")
    ckpt = write_checkpoint(root / "ckpt", "tiny-flash", quantized=True, seed=0)
    source = one_process_engine(ckpt)
    imports = [(p, *prefill_export(source, p)) for p in (random_tokens(21, 50), random_tokens(9, 51))]
    base = [random_tokens(n, seed) for seed, n in enumerate((5, 13, 29, 40, 3))]
    prefix = random_tokens(24, 60)  # 3 whole blocks: an aligned entry
    source.generate_ids([prefix], GREEDY)
    chain = source.kv.cache.prompt(prefix).hashes[-1]  # type: ignore[union-attr]
    work = {
        # round 2 extends round 1's prompts: each resumes from its entry, in the group that cached it
        "rounds": [base, [p + random_tokens(6, 100 + i) for i, p in enumerate(base)]],
        "prefix": (prefix, b"".join(source.export_prefix(chain, 1 << 20) or []), prefix + random_tokens(5, 61)),
        "concurrent": (imports, [random_tokens(19, 70), random_tokens(33, 71)]),
    }
    torch.save(work, root / "work.pt")
    return work, run_engine_ranks(ckpt, "2,4", root / "work.pt", root / "out", 4), ckpt


def test_dp_group_greedy_equals_one_process_with_prefix_hits(run) -> None:
    work, got, ckpt = run
    want = [[c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)] for prompts in work["rounds"]]
    assert got["rounds"] == want
    assert got["hits"] >= 5  # round 2 resumed from entries in both groups (slot and block copies sent to them)


def test_one_process_prefix_imported_into_the_dp_group_serves_an_extension(run) -> None:
    work, got, ckpt = run
    prefix, _, extended = work["prefix"]
    assert got["prefix"] == one_process_engine(ckpt).generate_ids([extended], GREEDY)[0].token_ids
    assert got["prefix_prefill_tokens"] <= len(extended) - len(prefix)  # resumed from the imported prefix


def test_sequences_are_shared_out_between_the_groups(run) -> None:
    _, got, _ = run
    groups = got["concurrent"]["groups"]  # imports, then exports: each pair was split between the groups
    assert sorted(groups[:2]) == [0, 1] and sorted(groups[2:]) == [0, 1]


def test_one_process_exports_continue_in_either_group(run) -> None:
    work, got, ckpt = run
    imports, _ = work["concurrent"]
    engine = one_process_engine(ckpt)
    for (prompt, token0, _), tokens in zip(imports, got["concurrent"]["imports"], strict=True):
        want = engine.generate_ids([prompt], GREEDY)[0].token_ids
        assert want[0] == token0
        assert tokens == want


def test_exports_of_either_group_continue_in_one_process(run) -> None:
    work, got, ckpt = run
    _, exports = work["concurrent"]
    engine = one_process_engine(ckpt)
    for prompt, (token0, blob) in zip(exports, got["concurrent"]["exports"], strict=True):
        want = engine.generate_ids([prompt], GREEDY)[0].token_ids
        assert token0 == want[0]
        assert continue_import(engine, prompt, token0, blob) == want


def test_groups_with_full_pools_preempt_within_their_own_group(tmp_path: Path) -> None:
    """Pools of 7 blocks per group (56 positions) for 6 prompts of 20-40 tokens + 8 generated: sequences are
    preempted and recomputed inside their group, and the tokens stay one process's."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 200 + n) for n in (20, 33, 40, 27, 38, 21)]
    work = {"rounds": [prompts], "config": {"num_blocks": 7, "prefix_cache": False}}
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2,4", tmp_path / "work.pt", tmp_path / "out", 4)
    assert got["preemptions"] > 0
    assert got["rounds"] == [[c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]]


def test_graphed_decode_steps_pad_every_group_to_one_shape(tmp_path: Path) -> None:
    """Decode steps through the graph path under data-parallel attention: chunked prefills leave one group without
    decode rows in some steps and the groups' rows and contexts differ, yet every rank ran the same graph shapes
    (each group pads to the largest group's bucket and the widest group's table, an empty group included: a
    capture on one rank that another skips would leave the MoE's exchange out of step), and the tokens stay one
    process's (on a CPU the padded steps run eagerly at "replay")."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 400 + n) for n in (3, 45, 17, 30, 6)]
    torch.save({"rounds": [prompts], "graphs": True}, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2,4", tmp_path / "work.pt", tmp_path / "out", 4)
    shapes = [torch.load(tmp_path / "out" / f"graphs{rank}.pt") for rank in range(4)]
    assert shapes[0] and all(s == shapes[0] for s in shapes[1:])
    assert {bucket for bucket, _ in shapes[0]} >= {2, 4}  # 5 rows split 2 / 3 between the groups, then fewer
    assert got["rounds"] == [[c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]]


def test_overlapped_decode_steps_under_data_parallel_attention(tmp_path: Path) -> None:
    """Overlapped scheduling across two data-parallel groups with graphs and pools small enough to preempt: steps
    are launched fed with the tokens of the step still in flight (each group's rows find theirs in the leader's
    broadcast), every rank runs the same graph shapes, and the tokens stay one synchronous process's. Then two
    prefills to export, one per group, run in a launched step: their blobs continue in one process."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 600 + n) for n in (20, 33, 40, 5, 38, 21)]
    exports = [random_tokens(19, 70), random_tokens(33, 71)]
    config = {"num_blocks": 7, "prefix_cache": False, "overlap_scheduling": True}
    work = {"rounds": [prompts], "graphs": True, "config": config, "concurrent": ([], exports)}
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2,4", tmp_path / "work.pt", tmp_path / "out", 4)
    assert got["preemptions"] > 0 and got["fed_steps"] >= 3
    shapes = [torch.load(tmp_path / "out" / f"graphs{rank}.pt") for rank in range(4)]
    assert shapes[0] and all(s == shapes[0] for s in shapes[1:])
    engine = one_process_engine(ckpt)
    assert got["rounds"] == [[c.token_ids for c in engine.generate_ids(prompts, GREEDY)]]
    assert sorted(got["concurrent"]["groups"]) == [0, 1]
    for prompt, (token0, blob) in zip(exports, got["concurrent"]["exports"], strict=True):
        want = engine.generate_ids([prompt], GREEDY)[0].token_ids
        assert token0 == want[0] and continue_import(engine, prompt, token0, blob) == want


def test_mtp_under_data_parallel_attention(tmp_path: Path) -> None:
    """MTP speculative decoding across two data-parallel groups with graphs: each verification step is split between
    the groups (one of them without rows in some steps: it replays a padded step, so both MoE exchanges, the main
    model's and the MTP's, line up), oracle drafts accepted every other time and then the model's own, over chunked
    prefills whose MTP calls are split the same way. The tokens are plain decoding's and every rank replayed the same
    verification shapes. A prefill to export in each group carries its MTP state and the MTP's draft (the other
    group's through the step channel), and continues in a one-process MTP engine."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    engine = one_process_engine(ckpt)
    prompts = [random_tokens(n, 80 + n) for n in (1, 9, 16, 33, 5)]
    truth = [c.token_ids for c in engine.generate_ids(prompts, GREEDY)]
    exports = [random_tokens(19, 72), random_tokens(33, 73)]
    work = {
        "mtp": list(zip(prompts, truth, strict=True)),
        "rounds": [[random_tokens(n, 90 + n) for n in (5, 21, 12)]],
        "graphs": True,
        "concurrent": ([], exports),
    }
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2,4", tmp_path / "work.pt", tmp_path / "out", 4)
    shapes = [torch.load(tmp_path / "out" / f"verify_graphs{rank}.pt") for rank in range(4)]
    assert shapes[0] and all(s == shapes[0] for s in shapes[1:]), shapes
    assert got["mtp"]["tokens"] == truth
    assert 0 < got["mtp"]["accepted"] < got["mtp"]["proposed"]
    assert got["mtp"]["one_group_verifies"] > 0
    assert got["rounds"] == [[c.token_ids for c in engine.generate_ids(work["rounds"][0], GREEDY)]]
    assert sorted(got["concurrent"]["groups"]) == [0, 1]
    mtp = LLMEngine(load_model(ckpt, dtype=torch.float64), None, replace(CONFIG, speculative_mtp=True))
    for prompt, (token0, blob) in zip(exports, got["concurrent"]["exports"], strict=True):
        snapshot = kv_export.load(mtp.model, blob)
        assert snapshot.mtp_layers == 1 and snapshot.mtp_draft is not None
        want = engine.generate_ids([prompt], GREEDY)[0].token_ids
        _check_drafts(mtp.model, prompt + want[:1], {len(prompt) + 1: snapshot.mtp_draft})
        proposed = mtp.runner.drafts.proposed
        assert token0 == want[0] and continue_import(mtp, prompt, token0, blob) == want
        assert mtp.runner.drafts.proposed > proposed  # it verified drafts, the blob's first


def test_overlapped_mtp_under_data_parallel_attention(tmp_path: Path) -> None:
    """Overlapped scheduling with MTP across two data-parallel groups with graphs: launched verification steps split
    between the groups, each group's fed rows found in the leader's broadcast; the tokens stay plain decoding's and
    every rank replayed the same verification shapes."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 130 + n) for n in (1, 9, 16, 33, 5)]
    truth = [c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]
    work = {"mtp": list(zip(prompts, truth, strict=True)), "graphs": True, "config": {"overlap_scheduling": True}}
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2,4", tmp_path / "work.pt", tmp_path / "out", 4)
    assert got["mtp"]["tokens"] == truth
    assert got["fed_steps"] > 0 and got["mtp"]["accepted"] > 0
    shapes = [torch.load(tmp_path / "out" / f"verify_graphs{rank}.pt") for rank in range(4)]
    assert shapes[0] and all(s == shapes[0] for s in shapes[1:])
