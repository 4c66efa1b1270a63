"""The engine's prefix cache: the same tokens with the cache on and off, and the prefill it saves.

The model runs in float64 here: with the cache on, a prompt's prefill is cut into other chunks (it resumes at a cached
position, or stops at a snapshot point), and in fp32 GEMMs round differently with the chunk shape, which can flip a
near-tie greedy token of a random test model (as the e2e suite, whose workers run float64 for the same reason).
tiny-flash: window 16, CSA m = 4, HCA m = 8; block size 8 here, so prompts cross many blocks.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.kv_state import KVCacheManager
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.prefix_cache import CacheEntry, PrefixCache, common_prefix, snapshot_points
from dsv4.model_runtime.engine.prefix_hash import chain_seed
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.weights import load_model

pytestmark = pytest.mark.unit

BLOCK = 8
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=5, temperature=0.9, top_k=40, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def model64(flash_ckpt: Path) -> DeepseekV4:
    return load_model(flash_ckpt, dtype=torch.float64)


Make = Callable[..., LLMEngine]


@pytest.fixture(scope="module")
def make(model64: DeepseekV4) -> Make:
    def build(cache: bool, **config: int) -> LLMEngine:
        fields: dict[str, int] = {"block_size": BLOCK, "max_num_batched_tokens": 16, **config}
        return LLMEngine(model64, None, EngineConfig(prefix_cache=cache, **fields))  # type: ignore[arg-type]

    return build


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _one_by_one(engine: LLMEngine, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
    return [engine.generate_ids([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]


def _check_pool(engine: LLMEngine) -> None:
    """Every block of a running sequence is held (never free), and the free list holds each block once."""
    kv = engine.kv
    free = kv._free_blocks
    assert len(free) == len(set(free))
    for seq in engine.scheduler.running:
        assert seq.state is not None
        for b in seq.state.table:  # type: ignore[attr-defined]
            assert kv._seq_refs[b] > 0 and b not in free


@pytest.mark.parametrize("system_len", [7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33])
def test_shared_system_prompt_gives_the_same_tokens_and_is_reused(make: Make, system_len: int) -> None:
    """Lengths around CSA (4), HCA (8) and block (8) ends, inside and past the 16-token window, one request after
    another. The first cannot know where the prompts will branch: the second resumes at the first's block boundary
    or end if it is inside the shared part, else computes the prefix again and snapshots where they branch; from
    the third on, less than a block of the shared prefix is computed again."""
    system = _tokens(system_len, system_len)
    prompts = [system + _tokens(3 + i, 100 + i) for i in range(4)]
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    expected = _one_by_one(make(False), prompts, params)
    engine = make(True)
    computed = []
    for p, sp in zip(prompts, params, strict=True):
        before = engine.stats_extra()["prefill_tokens"]
        assert engine.generate_ids([p], sp)[0].token_ids == expected[len(computed)]
        computed.append(engine.stats_extra()["prefill_tokens"] - before)
    unique = [len(p) - system_len for p in prompts]
    assert computed[0] == len(prompts[0])
    assert computed[1] <= len(prompts[1])
    for k in (2, 3):
        assert computed[k] <= unique[k] + (BLOCK - 1), f"request {k} recomputed more than a block of the prefix"
    if system_len >= BLOCK:  # a snapshot inside a prompt must save a block's worth: shorter prefixes get none
        assert engine.stats_extra()["prefix_cache_hits"] >= 2
    assert engine.kv.used_blocks == 0


def test_multi_turn_chat_computes_each_turns_new_tokens_only(make: Make) -> None:
    """Turn k's prompt is turn k-1's prompt, its answer and a new user message: only the last two are computed."""

    def chat(engine: LLMEngine) -> tuple[list[list[int]], list[int]]:
        prompt, answers, new_tokens = _tokens(21, 1), [], []
        for turn in range(4):
            before = engine.stats_extra()["prefill_tokens"]
            out = engine.generate_ids([prompt], SEEDED if turn % 2 else GREEDY)[0].token_ids
            new_tokens.append(int(engine.stats_extra()["prefill_tokens"] - before))
            answers.append(out)
            prompt = prompt + out + _tokens(6 + turn, 50 + turn)
        return answers, new_tokens

    off_answers, off_computed = chat(make(False))
    on_answers, on_computed = chat(make(True))
    assert on_answers == off_answers
    turn_growth = [21] + [len(off_answers[k]) + 6 + k for k in range(3)]  # answer + new message of each turn
    assert on_computed == turn_growth
    assert off_computed == [sum(turn_growth[: k + 1]) for k in range(4)]


def test_concurrent_requests_racing_on_one_prefix_compute_it_once(make: Make) -> None:
    """Six requests sharing 29 tokens arrive together: one computes the prefix, the others wait for its snapshot."""
    system = _tokens(29, 3)
    prompts = [system + _tokens(5 + i, 200 + i) for i in range(6)]
    params = [GREEDY if i % 2 else SEEDED for i in range(6)]
    expected = _one_by_one(make(False), prompts, params)
    engine = make(True)
    assert [o.token_ids for o in engine.generate_ids(prompts, params)] == expected
    extra = engine.stats_extra()
    assert extra["prefill_tokens"] == 29 + sum(len(p) - 29 for p in prompts)
    assert extra["prefix_cache_hits"] == 5


def test_eviction_under_pressure_keeps_running_blocks_and_the_tokens(make: Make) -> None:
    """A pool of 20 blocks and 3 snapshot slots for 12 requests over 3 system prompts, staggered: entries are
    evicted (never a running sequence's blocks), sequences are preempted, and every request gets its tokens."""
    systems = [_tokens(19 + 5 * k, 300 + k) for k in range(3)]
    prompts = [systems[i % 3] + _tokens(4 + i % 5, 400 + i) for i in range(12)]
    params = [GREEDY if i % 3 else SEEDED for i in range(12)]
    expected = _one_by_one(make(False), prompts, params)
    engine = make(True, num_blocks=20, prefix_cache_slots=3, max_num_batched_tokens=24)
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        for i, p in pending[:2]:
            engine.add_request(f"r{i}", p, params[i])
        pending = pending[2:]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        _check_pool(engine)
    assert [tokens[f"r{i}"] for i in range(12)] == expected
    extra = engine.stats_extra()
    assert extra["prefix_cache_evictions"] > 0 and extra["preemptions"] > 0
    assert extra["prefix_cache_hits"] > 0
    assert engine.kv.used_blocks == 0
    assert engine.kv.cached_blocks <= 20


def test_cache_off_takes_no_snapshot_and_hits_nothing(make: Make) -> None:
    engine = make(False)
    prompt = _tokens(30, 9)
    engine.generate_ids([prompt, [*prompt, 5]], GREEDY)
    assert engine.kv.cache is None and engine.stats_extra()["prefill_tokens"] == 61
    assert engine.cached_prefix_len([*prompt, 5, 6]) == 0


def test_an_exported_prefix_imported_elsewhere_continues_like_a_local_one(make: Make) -> None:
    """Engine A computes a 24-token prefix (3 blocks) and exports its aligned entry; engine B imports it, and a request
    extending it computes only its own tokens and gets the tokens of an engine without a cache."""
    prefix = _tokens(24, 21)
    a = make(True)
    a.generate_ids([prefix + _tokens(5, 22)], GREEDY)
    held = a.held_prefixes()
    chain = a.kv.cache.prompt(prefix).hashes[-1]  # type: ignore[union-attr]
    assert chain in held
    blob = b"".join(a.export_prefix(chain, 1 << 20) or [])
    b = make(True)
    assert b.import_prefix(prefix, kv_export.load(b.model, blob))
    assert not b.import_prefix(prefix, kv_export.load(b.model, blob)), "a second import of a held prefix is a no-op"
    assert [e.chain_hash for e in b.prefix_events()] == [chain]
    prompt = prefix + _tokens(7, 23)
    assert b.cached_prefix_len(prompt) == 24
    for params in (GREEDY, SEEDED):
        want = make(False).generate_ids([prompt], params)[0].token_ids
        before = b.stats_extra()["prefill_tokens"]
        assert b.generate_ids([prompt], params)[0].token_ids == want
        assert b.stats_extra()["prefill_tokens"] - before <= 7
    with pytest.raises(ValueError, match="covers 24 positions, not 23"):
        b.import_prefix(prefix[:23], kv_export.load(b.model, blob))


def test_prefix_events_report_aligned_entries_stored_and_evicted(make: Make) -> None:
    engine = make(True, prefix_cache_slots=2)
    engine.generate_ids([_tokens(20, 31)], GREEDY)  # entries at 16 (aligned) and 20
    first = engine.prefix_events()
    assert [e.op for e in first] == ["stored"]
    engine.generate_ids([_tokens(20, 32)], GREEDY)  # two more entries evict both
    ops = [e.op for e in engine.prefix_events()]
    assert ops.count("evicted") == 1 and ops.count("stored") == 1
    assert first[0].chain_hash not in engine.held_prefixes()


def test_lookup_prefers_the_longest_entry_and_checks_tail_tokens() -> None:
    """Pure bookkeeping: entries under their last full block's hash, tails compared token by token."""
    cache = PrefixCache(4, chain_seed("fp", 4), range(10, 14))
    tokens = list(range(100, 120))
    for position, slot in ((8, 10), (11, 11), (6, 12)):
        p = cache.prompt(tokens[:position])
        cache.insert(CacheEntry(position, array("l", p.tokens), tuple(p.hashes), (), slot))
    probe = cache.prompt(tokens)
    assert cache.lookup(probe, 19).position == 11  # type: ignore[union-attr]
    assert cache.lookup(probe, 10).position == 8  # type: ignore[union-attr]
    other_tail = cache.prompt([*tokens[:9], 7, 7, 7])
    assert cache.lookup(other_tail, 11).position == 8  # type: ignore[union-attr]
    assert cache.lookup(cache.prompt([1, 2, 3]), 2) is None
    assert common_prefix(probe, other_tail, 4) == 9
    # segmented LRU: a hit entry outlives entries never hit, whatever their age
    cache.use(cache.get(probe, 6))  # type: ignore[arg-type]
    order = []
    while (victim := cache.victim()) is not None:
        order.append(victim.position)
        cache.remove(victim)
    assert order == [8, 11, 6]


def test_snapshot_points_are_the_end_the_branches_and_the_blocks_below() -> None:
    cache = PrefixCache(8, chain_seed("fp", 8), range(4))
    prompt = cache.prompt(list(range(50)))
    others = [cache.prompt(list(range(29)) + [9] * 10), cache.prompt(list(range(29)) + [8] * 3)]
    assert snapshot_points(cache, prompt, 0, others, min_gain=8) == [24, 29, 48, 50]
    assert snapshot_points(cache, prompt, 26, others, min_gain=8) == [48, 50]  # 29 saves too little over 26


def test_kv_cache_manager_refuses_negative_prefix_slots(model64: DeepseekV4) -> None:
    with pytest.raises(ValueError, match="prefix_slots"):
        KVCacheManager(model64, 8, 8, 2, prefix_slots=-1)


def test_warm_up_leaves_no_trace_in_the_cache_the_counters_or_the_tokens(make: Make) -> None:
    """A worker warms its engine before it reports ready; afterwards nothing may show that it did: no cache entry
    (a router would send prompts here for a prefix nobody asked for), no event, no counted prefill, every block
    free, and a request draws the tokens a never-warmed engine draws."""
    prompt = _tokens(21, seed=5)
    cold = make(True).generate_ids([prompt], GREEDY)[0].token_ids
    engine = make(True)
    free_before = len(engine.kv._free_blocks)
    seconds = engine.warm_up(prompt_tokens=2 * BLOCK + 3)
    assert seconds > 0
    stats = engine.stats_extra()
    assert stats["prefill_tokens"] == 0 and stats["prefix_cache_queries"] == 0
    assert stats["prefix_cache_entries"] == 0 and stats["prefix_cache_blocks"] == 0
    assert engine.prefix_events() == [] and engine.held_prefixes() == []
    assert len(engine.kv._free_blocks) == free_before
    assert engine.generate_ids([prompt], GREEDY)[0].token_ids == cold
    assert engine.stats_extra()["prefill_tokens"] == len(prompt)
