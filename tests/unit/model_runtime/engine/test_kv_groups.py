"""The leader's KV bookkeeping under data-parallel attention (`kv_groups.GroupKV`), without ranks: where sequences
go, what each group's ranks are sent, and what the engine reports."""

from __future__ import annotations

import pytest
import torch

from dsv4.model_runtime.engine.kv_groups import GroupKV
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
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


def test_an_engine_of_several_groups_refuses_the_prefix_cache(model: DeepseekV4) -> None:
    with pytest.raises(ValueError, match="prefix cache"):
        LLMEngine(model, None, EngineConfig(num_blocks=8, block_size=8), kv_groups=2)
    engine = LLMEngine(model, None, EngineConfig(num_blocks=8, block_size=8, prefix_cache=False), kv_groups=2)
    assert isinstance(engine.kv, GroupKV) and engine.kv.total_blocks == 16
    stats = engine.stats_extra()  # what /metrics reports: every group's pool
    assert stats["kv_pool_blocks"] == 16 and stats["kv_pool_max_tokens"] == 2 * engine.kv_budget.max_tokens
    assert engine.kv.pool.window[0].device == torch.device("cpu")
