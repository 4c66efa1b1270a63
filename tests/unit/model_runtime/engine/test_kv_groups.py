"""The leader's KV bookkeeping under data-parallel attention (`kv_groups.GroupKV`), without ranks: where sequences
go, what each group's ranks are sent, and what the engine reports."""

from __future__ import annotations

import pytest
import torch

from dsv4.model_runtime.engine.kv_groups import GroupKV
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.port import PrefixEvent
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

pytestmark = pytest.mark.unit


def _seq(name: str, n: int) -> Request:
    return Request(name, list(range(3, 3 + n)), SamplingParams(), seed=0, eos_token_id=None)


def _kv(model: DeepseekV4, groups: int = 2) -> GroupKV:
    kv = GroupKV(model, num_blocks=8, block_size=8, num_slots=3, groups=groups)
    for pool in kv.pools:
        pool.journal = []
    return kv


def test_new_sequences_go_to_the_group_with_the_most_free_blocks(model: DeepseekV4) -> None:
    kv = _kv(model)
    a, b, c = _seq("a", 30), _seq("b", 5), _seq("c", 5)
    kv.grow(a, 30)  # 4 blocks of group 0 (ties go to the lowest group)
    kv.grow(b, 5)  # group 1 has 8 free
    kv.grow(c, 5)  # group 1 has 7 free, group 0 has 4
    assert [kv.group_of(s) for s in (a, b, c)] == [0, 1, 1]
    assert kv.total_blocks == 16 and kv.used_blocks == 6
    kv.free(b)
    assert kv.used_blocks == 5 and kv.group_of(b) == -1


def test_a_sequence_must_fit_one_group_and_grows_only_in_its_own(model: DeepseekV4) -> None:
    kv = _kv(model)
    assert kv.fits_alone(64) and not kv.fits_alone(65)  # 8 blocks of 8 per group, though 16 in all
    a, b = _seq("a", 60), _seq("b", 60)
    kv.grow(a, 60)
    kv.grow(b, 60)
    assert {kv.group_of(a), kv.group_of(b)} == {0, 1}
    a.num_computed = 60
    assert kv.can_grow(a, 4) and not kv.can_grow(a, 5)  # 8 blocks hold 64 positions; its group has no 9th
    assert kv.shares_pool(a, a) and not kv.shares_pool(a, b)  # preempting b cannot make room for a
    kv.free(b)
    assert not kv.can_grow(a, 5)  # b's blocks are in the other group
    assert kv.can_grow(_seq("c", 60), 60)


def test_remote_groups_record_their_writes_and_hold_no_storage(model: DeepseekV4) -> None:
    kv = _kv(model)
    a, b = _seq("a", 9), _seq("b", 9)
    kv.grow(a, 9)
    kv.grow(b, 9)
    remote = kv.pools[kv.group_of(b)]
    assert remote is not kv.pool
    assert remote.journal == [("reset_slot", b.state.slot)]  # type: ignore[union-attr]
    assert kv.pool.journal == [("reset_slot", a.state.slot)]  # type: ignore[union-attr]
    assert all(t.device.type == "meta" for t in remote.window)
    assert remote.block_tables.device.type == "cpu"  # sent with each call
    remote.flush_block_tables()
    assert remote.block_tables[b.state.slot, :2].tolist() == b.state.table  # type: ignore[union-attr]


def test_an_engine_of_several_groups_counts_every_pool(model: DeepseekV4) -> None:
    engine = LLMEngine(model, None, EngineConfig(num_blocks=8, block_size=8), kv_groups=2)
    assert isinstance(engine.kv, GroupKV) and engine.kv.total_blocks == 16
    stats = engine.stats_extra()  # what /metrics reports: every group's pool
    assert stats["kv_pool_blocks"] == 16 and stats["kv_pool_max_tokens"] == 2 * engine.kv_budget.max_tokens
    assert engine.kv.pool.window[0].device == torch.device("cpu")


def _cached(kv: GroupKV, seq: Request, position: int, group: int | None = None) -> None:
    """Give `seq` a state standing at `position` (in `group`, else where `grow` puts it) and make a cache entry of
    it."""
    assert kv.cache is not None
    (kv.groups[group] if group is not None else kv).grow(seq, position)
    assert seq.state is not None
    seq.num_computed = seq.state.position = position
    prompt = kv.cache.prompt(seq.prompt_token_ids)
    assert kv.snapshot(seq, prompt, position) is not None


def test_prefix_caches_of_every_group_serve_as_one(model: DeepseekV4) -> None:
    kv = GroupKV(model, num_blocks=8, block_size=8, num_slots=3, groups=2, prefix_slots=2, prefix_seed=b"seed")
    cache = kv.cache
    assert cache is not None
    for pool in kv.pools:
        pool.journal = []
    a, b = _seq("a", 16), _seq("b", 30)
    _cached(kv, b, 24)  # group 0: 3 blocks of b's prompt
    _cached(kv, a, 16)  # group 1 (more free blocks): a's prompt, aligned at 16
    assert [kv.group_of(s) for s in (b, a)] == [0, 1]
    # A prompt extending a's resumes in group 1, where the entry's blocks are, though group 0 ...
    c = _seq("c", 20)
    prompt = cache.prompt(c.prompt_token_ids)
    entry = cache.lookup(prompt, 19)
    assert entry is not None and entry.position == 16 and cache.group_of(entry) == 1
    kv.free(b)  # ... now has more free blocks
    assert kv.admit(c, entry, 4) and kv.group_of(c) == 1 and c.num_computed == 16
    remote = kv.pools[1]
    assert ("copy_slot", entry.slot, c.state.slot) in (remote.journal or [])  # type: ignore[union-attr]
    # Events: a prefix stored in both groups is announced once and evicted when the last group drops it.
    h = entry.chain_hash
    assert PrefixEvent("stored", h) in cache.drain_events()
    kv.free(c)
    _cached(kv, _seq("d", 16), 16, group=0)  # a's tokens, cached in group 0 too
    assert [e for e in cache.drain_events() if e.chain_hash == h] == []
    assert cache.chain_hashes().count(h) == 1
    while kv.groups[1].evict():
        pass
    assert [e for e in cache.drain_events() if e.chain_hash == h] == []  # group 0 still holds it
    while kv.groups[0].evict():
        pass
    assert PrefixEvent("evicted", h) in cache.drain_events()
    assert cache.stats.evictions == 3 and len(cache) == 0  # b's, a's and d's entries; one counter for all
