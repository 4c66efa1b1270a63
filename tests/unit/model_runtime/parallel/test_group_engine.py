"""The group engine over 2 gloo ranks started by the real launcher (tiny-flash, float64): the leader's greedy tokens
equal a one-process engine's, prefix-cache hits included (their slot and block copies mirrored on the follower),
and KV state moves between layouts: a TP1 export continues in the TP2 group, a TP2 export continues in a TP1
engine, and a TP1 prefix imported into the group's cache serves a prompt extending it.

float64 for the reason of test_prefix_cache.py: the cache cuts prefills into other chunks, and the ranks sum partial
results in another order than one process, so fp32 could flip a near-tie token of the random model.
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
    """One TP2 group run of engine_rank.py's work; returns (the work, the group's results, the checkpoint)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("group-engine")
    ckpt = write_checkpoint(root / "ckpt", "tiny-flash", quantized=True, seed=0)
    base = [random_tokens(n, seed) for seed, n in enumerate((5, 13, 29, 40))]
    # round 2 resumes from round 1's entries
    rounds = [base, [p + random_tokens(6, 100 + i) for i, p in enumerate(base)]]
    source = one_process_engine(ckpt)
    imported = random_tokens(21, 50)
    token0, blob = prefill_export(source, imported)
    prefix = random_tokens(24, 60)  # 3 whole blocks: an aligned entry
    source.generate_ids([prefix], GREEDY)
    chain = source.kv.cache.prompt(prefix).hashes[-1]  # type: ignore[union-attr]
    prefix_blob = b"".join(source.export_prefix(chain, 1 << 20) or [])
    work = {
        "rounds": rounds,
        "import": (imported, token0, blob),
        "export": random_tokens(19, 70),
        "prefix": (prefix, prefix_blob, prefix + random_tokens(5, 61)),
    }
    torch.save(work, root / "work.pt")
    return work, run_engine_ranks(ckpt, "2", root / "work.pt", root / "out", 2), ckpt


def test_group_greedy_equals_one_process_with_prefix_hits(run) -> None:
    work, got, ckpt = run
    engine = one_process_engine(ckpt)
    want = [[c.token_ids for c in engine.generate_ids(prompts, GREEDY)] for prompts in work["rounds"]]
    assert got["rounds"] == want
    assert engine.stats_extra()["prefix_cache_hits"] >= 4  # round 2 resumed from cache entries
    assert got["hits"] >= 4  # and so did the group, on copies the follower mirrored


def test_tp1_export_continues_in_tp2_group(run) -> None:
    work, got, ckpt = run
    prompt, token0, _ = work["import"]
    want = one_process_engine(ckpt).generate_ids([prompt], GREEDY)[0].token_ids
    assert want[0] == token0
    assert got["import"] == want


def test_tp2_export_continues_in_tp1_engine(run) -> None:
    work, got, ckpt = run
    token0, blob = got["export"]
    engine = one_process_engine(ckpt)
    want = engine.generate_ids([work["export"]], GREEDY)[0].token_ids
    assert token0 == want[0]
    assert continue_import(engine, work["export"], token0, blob) == want


def test_tp1_prefix_imported_into_tp2_group_serves_an_extension(run) -> None:
    work, got, ckpt = run
    prefix, _, extended = work["prefix"]
    no_cache = LLMEngine(load_model(ckpt, dtype=torch.float64), None, replace(CONFIG, prefix_cache=False))
    assert got["prefix"] == no_cache.generate_ids([extended], GREEDY)[0].token_ids
    assert got["prefix_prefill_tokens"] <= len(extended) - len(prefix)  # resumed from the imported prefix


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """A TP2 group running MTP speculative decoding: oracle drafts (accepted every other time), then the model's own
    (rejected: the random MTP guesses wrong) over chunked prefills and verification steps, through the graph path
    (eager at "replay" on a CPU)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("group-mtp")
    ckpt = write_checkpoint(root / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 80 + n) for n in (1, 9, 16, 33)]
    truth = [c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]
    work = {
        "mtp": list(zip(prompts, truth, strict=True)),
        "rounds": [[random_tokens(n, 90 + n) for n in (5, 21)]],
        "graphs": True,
    }
    torch.save(work, root / "work.pt")
    return work, run_engine_ranks(ckpt, "2", root / "work.pt", root / "out", 2), ckpt


def test_mtp_in_a_group_gives_the_tokens_of_plain_decoding(mtp_run) -> None:
    work, got, ckpt = mtp_run
    out = ckpt.parent / "out"
    shapes = [torch.load(out / f"verify_graphs{rank}.pt") for rank in range(2)]
    assert shapes[0] and shapes[0] == shapes[1], shapes  # every rank replayed the same verification steps
    assert got["mtp"]["tokens"] == [t for _, t in work["mtp"]]
    proposed, accepted = got["mtp"]["proposed"], got["mtp"]["accepted"]
    assert 0 < accepted < proposed  # verification kept drafts and rolled others back, on both ranks
    want = [[c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)] for prompts in work["rounds"]]
    assert got["rounds"] == want


def test_overlapped_mtp_in_a_group_gives_the_tokens_of_plain_decoding(tmp_path: Path) -> None:
    """Overlapped scheduling with MTP in a TP2 group with graphs: verification steps are launched before the previous
    one's draws reach the leader's host, every rank taking each fed row's token, position and draft from the
    leader's broadcast, and the tokens stay plain decoding's (oracle drafts from the host, the model's own from the
    device). Prefills to export run in launched steps too: their blobs carry the MTP's draft, which is the one a
    one-process MTP predicts (the followers' MTP took the first token from the leader's broadcast)."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 120 + n) for n in (1, 9, 16, 33)]
    truth = [c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]
    exports = [random_tokens(19, 140), random_tokens(33, 141)]
    work = {
        "mtp": list(zip(prompts, truth, strict=True)),
        "graphs": True,
        "config": {"overlap_scheduling": True},
        "concurrent": ([], exports),
    }
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2", tmp_path / "work.pt", tmp_path / "out", 2)
    assert got["mtp"]["tokens"] == truth
    assert got["fed_steps"] > 0 and got["mtp"]["accepted"] > 0
    shapes = [torch.load(tmp_path / "out" / f"verify_graphs{rank}.pt") for rank in range(2)]
    assert shapes[0] and shapes[0] == shapes[1]
    # prefills to export in launched steps: both ranks' MTP paired the last position with the token on its way
    model = load_model(ckpt, dtype=torch.float64)
    for prompt, (token0, blob) in zip(exports, got["concurrent"]["exports"], strict=True):
        snapshot = kv_export.load(model, blob)
        assert snapshot.mtp_layers == 1 and snapshot.mtp_draft is not None
        _check_drafts(model, [*prompt, token0], {len(prompt) + 1: snapshot.mtp_draft})


def test_graphed_decode_steps_in_a_group_give_one_process_tokens(tmp_path: Path) -> None:
    """Decode steps through the graph path on both ranks (rows padded to batch buckets with sink-slot rows, block
    tables to bucket widths; on a CPU the padded step runs eagerly where a GPU replays its capture)."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    prompts = [random_tokens(n, 300 + n) for n in (3, 17, 30)]
    torch.save({"rounds": [prompts], "graphs": True}, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2", tmp_path / "work.pt", tmp_path / "out", 2)
    assert got["graph_shapes"] and all(bucket in (1, 2, 4) for bucket, _ in got["graph_shapes"])
    assert got["rounds"] == [[c.token_ids for c in one_process_engine(ckpt).generate_ids(prompts, GREEDY)]]


def test_overlapped_decode_steps_in_a_group_give_one_process_tokens(tmp_path: Path) -> None:
    """Overlapped scheduling in a TP2 group with graphs: decode steps are launched before the previous step's
    tokens reach the leader's host, every rank feeding them from the leader's broadcast, and the tokens stay one
    (synchronous) process's, arrivals beside chunked prefills and a prefix hit's copies included."""
    torch.set_num_threads(1)
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    base = [random_tokens(n, 500 + n) for n in (2, 19, 11)]
    rounds = [base, [base[1] + random_tokens(4, 510)]]
    work = {"rounds": rounds, "graphs": True, "config": {"overlap_scheduling": True}}
    torch.save(work, tmp_path / "work.pt")
    got = run_engine_ranks(ckpt, "2", tmp_path / "work.pt", tmp_path / "out", 2)
    assert got["fed_steps"] >= 5
    engine = one_process_engine(ckpt)
    assert not engine.overlap
    assert got["rounds"] == [[c.token_ids for c in engine.generate_ids(prompts, GREEDY)] for prompts in rounds]
