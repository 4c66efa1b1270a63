"""Continuous batching: a request's greedy tokens do not depend on the batch, the chunking or preemption."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

N_REQUESTS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    """16 prompts of mixed lengths: inside the 16-token window, around CSA (4) and HCA (8) block ends, past it."""
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33, 41]
    assert len(lengths) == N_REQUESTS
    return [torch.randint(3, 128000, (n,), generator=gen).tolist() for n in lengths]


def _params(i: int) -> SamplingParams:
    return SamplingParams(max_tokens=3 + i % 6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(make_engine: Callable[..., LLMEngine]) -> list[list[int]]:
    """Each request run by itself in an empty engine, whole-prompt prefill."""
    out = []
    for i, p in enumerate(_prompts()):
        engine = make_engine(chunked_prefill=False)
        out.append(engine.generate_ids([p], _params(i))[0].token_ids)
    return out


def _run_staggered(engine: LLMEngine) -> tuple[dict[str, list[int]], int]:
    """Requests join at different steps (two per step) while others decode; returns tokens and the max batch."""
    prompts = _prompts()
    tokens: dict[str, list[int]] = {}
    max_batch = 0
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        for i, p in pending[:2]:
            engine.add_request(f"r{i}", p, _params(i))
        pending = pending[2:]
        outs = engine.step()
        max_batch = max(max_batch, engine.num_running)
        for o in outs:
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    return tokens, max_batch


@pytest.mark.parametrize(
    "config",
    [
        {"chunked_prefill": True, "max_num_batched_tokens": 12},
        {"chunked_prefill": False, "max_num_batched_tokens": 64},
    ],
    ids=["chunked", "whole-prompt"],
)
def test_greedy_same_alone_and_in_a_batch(
    config: dict[str, int | bool], alone: list[list[int]], make_engine: Callable[..., LLMEngine]
) -> None:
    engine = make_engine(**config)
    tokens, max_batch = _run_staggered(engine)
    assert max_batch >= 4, "the requests should overlap in the batch"
    for i, expected in enumerate(alone):
        assert len(expected) == _params(i).max_tokens
        assert tokens[f"r{i}"] == expected, f"request {i} (prompt of {len(_prompts()[i])} tokens)"
    assert engine.kv.used_blocks == 0


def test_greedy_same_under_preemption(alone: list[list[int]], make_engine: Callable[..., LLMEngine]) -> None:
    """A pool of 12 blocks of 8 positions cannot hold the batch: sequences are preempted and recomputed."""
    engine = make_engine(num_blocks=12, block_size=8, max_num_batched_tokens=24)
    preempted = 0
    seqs = [engine.add_request(f"r{i}", p, _params(i)) for i, p in enumerate(_prompts())]
    while engine.has_unfinished():
        engine.step()
        assert engine.kv.used_blocks <= engine.kv.total_blocks
    preempted = sum(s.num_preemptions for s in seqs)
    assert preempted > 0
    for i, s in enumerate(seqs):
        assert s.output_token_ids == alone[i], f"request {i} after {s.num_preemptions} preemptions"


def test_cancel_frees_state_and_leaves_others_alone(
    alone: list[list[int]], make_engine: Callable[..., LLMEngine]
) -> None:
    engine = make_engine(max_num_batched_tokens=16)
    prompts = _prompts()
    for i in (10, 12, 15):
        engine.add_request(f"r{i}", prompts[i], _params(i))
    engine.step()
    cancelled = engine.abort("r12")
    assert cancelled is not None and cancelled.finished and cancelled.finish_reason == "cancelled"
    assert engine.abort("r12") is None  # idempotent: unknown now
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    assert "r12" not in tokens
    assert tokens["r10"] == alone[10] and tokens["r15"] == alone[15]
    assert engine.kv.used_blocks == 0


def test_request_that_never_fits_is_refused(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(num_blocks=2, block_size=8)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(3, 20)), SamplingParams(max_tokens=8))
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("bad", [3, 10**7], GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("empty", [], GREEDY)
