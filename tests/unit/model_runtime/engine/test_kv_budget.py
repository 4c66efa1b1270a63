"""The KV pool's size: a fixed count, or a fraction of the memory free after loading; reported in the stats."""

from __future__ import annotations

import logging

import pytest
import torch

from dsv4.model_runtime.engine.kv_budget import CPU_AUTO_BLOCKS, KVBudgetError, budget_from_free, kv_budget
from dsv4.model_runtime.engine.kv_layout import bytes_per_token, sequence_constant_bytes
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.unit


def test_blocks_from_free_memory() -> None:
    """90% of 10 GiB, minus the slots, in blocks: floor((0.9 * free - slots) / block)."""
    free, block, slots = 10 << 30, 3 << 20, 512 << 20
    b = budget_from_free(free, 0.9, 256, block, slots)
    assert b.num_blocks == (int(free * 0.9) - slots) // block and b.max_tokens == b.num_blocks * 256
    assert b.pool_bytes <= 0.9 * free < b.pool_bytes + block
    assert "90% of the 10.00 GiB free after loading" in b.describe()
    with pytest.raises(KVBudgetError, match=r"90% of the 0.50 GiB free after loading is 0.45 GiB; the sequence"):
        budget_from_free(512 << 20, 0.9, 256, block, slots)


def test_engine_pool_on_cpu_and_its_stats(model, caplog: pytest.LogCaptureFixture) -> None:
    """On a CPU "auto" is the fixed CPU count; a given count wins; the engine reports the size and logs it."""
    cfg = model.cfg
    auto = kv_budget(cfg, torch.device("cpu"), torch.float32, True, 1, 256, 40, None, 0.9)
    assert auto.num_blocks == CPU_AUTO_BLOCKS and auto.free_bytes is None
    assert auto.block_bytes == round(bytes_per_token(cfg, torch.float32, True) * 256)
    assert auto.slot_bytes == 40 * sequence_constant_bytes(cfg, torch.float32, 1)
    with caplog.at_level(logging.INFO, logger="dsv4.model_runtime.engine"):
        engine = LLMEngine(model, None, EngineConfig(num_blocks=24, block_size=64))
    assert engine.kv.total_blocks == 24
    extra = engine.stats_extra()
    assert extra["kv_pool_blocks"] == 24 and extra["kv_pool_max_tokens"] == 24 * 64
    slots = engine.kv.num_slots + engine.config.prefix_cache_slots  # the prefix cache's snapshots are slots too
    assert extra["kv_pool_bytes"] == engine.kv.pool.block_bytes * 24 + engine.kv.pool.slot_bytes * slots
    assert "KV pool: 24 blocks of 64 positions = 1,536 tokens" in caplog.text
    with pytest.raises(KVBudgetError, match=r"kv_memory_fraction 1\.5"):
        kv_budget(cfg, torch.device("cpu"), torch.float32, True, 1, 256, 40, None, 1.5)
