"""The paged pool: the model computes exactly the same on paged (FP8/FP4) storage as on its own dense state."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime.engine.kv_layout import (
    FP4Codec,
    FP8NopeCodec,
    bytes_per_token,
    sequence_constant_bytes,
)
from dsv4.model_runtime.engine.kv_state import KVCacheManager, PagedSequenceState
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.qat import q4_hadamard, q8_nope
from dsv4.model_runtime.weights import load_model

pytestmark = pytest.mark.unit


def _seq(name: str, n: int) -> Request:
    return Request(name, list(range(3, 3 + n)), SamplingParams(), seed=0, eos_token_id=None)


def _paged_states(model: DeepseekV4, lengths: list[int], block_size: int = 8) -> tuple[KVCacheManager, list[Request]]:
    kv = KVCacheManager(model, num_blocks=64, block_size=block_size, num_slots=len(lengths))
    seqs = [_seq(f"s{i}", n) for i, n in enumerate(lengths)]
    for s in seqs:
        kv.grow(s, s.num_tokens + 12)  # the prompt and 12 decode steps
    return kv, seqs


def _drive(model: DeepseekV4, states: list, ids: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Chunked prefill of all rows by `cuts`, then 12 batched decode steps; all logits."""
    out = [model.prefill(ids[:, a:b], states) for a, b in itertools.pairwise(cuts)]
    for k in range(12):
        out.append(model.decode(ids[:, k % ids.shape[1]], states))
    return out


@pytest.mark.parametrize(
    ("qat", "dtype"),
    [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
    ids=["fp8-fp4", "model-dtype", "bf16-fp8-fp4"],
)
def test_paged_state_computes_exactly_like_the_dense_state(
    flash_ckpt: Path, model: DeepseekV4, qat: bool, dtype: torch.dtype
) -> None:
    m = model if qat and dtype == torch.float32 else load_model(flash_ckpt, dtype=dtype, qat_simulation=qat)
    ids = torch.randint(3, 128000, (3, 27), generator=torch.Generator().manual_seed(3))
    cuts = [0, 5, 6, 17, 27]
    dense = _drive(m, [m.new_state() for _ in range(3)], ids, cuts)
    kv, seqs = _paged_states(m, [27, 27, 27])
    paged_states = [s.state for s in seqs]
    assert all(isinstance(s, PagedSequenceState) for s in paged_states)
    paged = _drive(m, paged_states, ids, cuts)
    for step, (a, b) in enumerate(zip(dense, paged, strict=True)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
    # 39 positions in blocks of 8 -> 5 blocks per sequence (40 reserved).
    assert kv.used_blocks == 15
    for s in seqs:
        kv.free(s)
    assert kv.used_blocks == 0 and s.state is None


def test_codecs_are_exact_on_the_values_the_model_stores() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 128, generator=gen) * torch.logspace(-6, 3, 50)[:, None]
    x[3] = 0.0
    entries = q8_nope(x, 64)
    fp8 = FP8NopeCodec(128, torch.float32, 64)
    assert torch.equal(fp8.decode(fp8.encode(entries)), entries)
    keys = q4_hadamard(x)
    fp4 = FP4Codec(128, torch.float32)
    assert torch.equal(fp4.decode(fp4.encode(keys)), keys)
    for bf16 in (entries.bfloat16(),):
        codec = FP8NopeCodec(128, torch.bfloat16, 64)
        assert torch.equal(codec.decode(codec.encode(bf16)), bf16)
    assert fp8.row_bytes == 64 + 1 + 64 * 4 and fp4.row_bytes == 64 + 4


def test_bytes_per_token_is_what_the_pool_holds(model: DeepseekV4) -> None:
    kv = KVCacheManager(model, num_blocks=4, block_size=16, num_slots=2)
    # tiny-flash, fp32 rope dims: CSA (m=4) entry 321 B + key 68 B per 4 tokens, HCA (m=8) entry per 8 tokens.
    expected = (321 + 68) / 4 + 321 / 8
    assert kv.bytes_per_token == pytest.approx(expected)
    assert bytes_per_token(model.cfg, torch.float32, low_precision=True) == pytest.approx(expected)
    allocated = sum(
        t.numel() * t.element_size()
        for store in [*kv.pool.entries, *kv.pool.index_keys]
        if store is not None
        for t in store.tensors.values()
    )
    assert allocated == kv.bytes_per_token * 16 * 4
    assert kv.pool.slot_bytes == sequence_constant_bytes(model.cfg, torch.float32, mtp_layers=len(model.mtp))


def test_pool_accounting(model: DeepseekV4) -> None:
    kv = KVCacheManager(model, num_blocks=3, block_size=8, num_slots=2)
    a, b, c = _seq("a", 9), _seq("b", 4), _seq("c", 1)
    assert kv.can_grow(a, 9)
    kv.grow(a, 9)
    assert kv.used_blocks == 2
    assert not kv.can_grow(b, 9) and kv.can_grow(b, 4)
    kv.grow(b, 4)
    assert not kv.can_grow(c, 1), "no slot left"
    kv.free(a)
    assert kv.can_grow(c, 1) and kv.used_blocks == 1
    with pytest.raises(ValueError, match="multiple of every compression ratio"):
        KVCacheManager(model, num_blocks=3, block_size=6, num_slots=2)


def test_host_copy_of_the_block_tables_follows_every_flush(model: DeepseekV4) -> None:
    # On a GPU the host copy is a tensor of its own (on the CPU `mirror_block_tables` shares the tables): a clone
    # stands in for it, and must see the writes the device tables get.
    kv, seqs = _paged_states(model, [9, 30])
    pool = kv.pool
    pool.mirror_block_tables()
    assert pool.host_block_tables is pool.block_tables
    pool.host_block_tables = pool.block_tables.clone()
    kv.grow(seqs[0], 9 + 40)  # more blocks for the first sequence
    pool.flush_block_tables()
    assert torch.equal(pool.host_block_tables, pool.block_tables)
    state = seqs[0].state
    assert isinstance(state, PagedSequenceState)
    assert pool.host_block_tables[state.slot, : len(state.table)].tolist() == state.table
