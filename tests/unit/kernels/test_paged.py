"""The paged decode ops: rows decoded exactly as the engine's codecs store them, attention and indexer over the
pool equal to the dense ops over the rows they read, and the cuda backend equal to the reference (fp32)."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.paged import FP8_NOPE, MXFP4, PLAIN, PagedRows
from dsv4.kernels.reference.paged import decode_rows
from dsv4.kernels.registry import lookup
from dsv4.model_runtime.engine.kv_layout import FP4Codec, FP8NopeCodec, RowCodec
from dsv4.model_runtime.qat import q4_hadamard, q8_nope

pytestmark = pytest.mark.unit

D, R, IC = 128, 64, 128  # entry width, its RoPE dims, indexer key width (multiples the formats need)


def _codec(fmt: str, width: int, dtype: torch.dtype) -> RowCodec:
    if fmt == FP8_NOPE:
        return FP8NopeCodec(width, dtype, R)
    return FP4Codec(width, dtype) if fmt == MXFP4 else RowCodec(width, dtype)


def _store(
    fmt: str, values: torch.Tensor, rows_per_block: int, order: torch.Tensor
) -> tuple[PagedRows, RowCodec, torch.Tensor]:
    """values [B, E, W] of B sequences, stored in pages of `rows_per_block` (blocks placed in permuted order, plus
    a sink row); returns the store, its codec and the block tables [B, E / rows_per_block]."""
    b, e, width = values.shape
    codec = _codec(fmt, width, values.dtype)
    pages = e // rows_per_block
    tables = order.view(b, pages).to(torch.int32)
    flat = (tables.long()[:, :, None] * rows_per_block + torch.arange(rows_per_block)).flatten(1)  # [B, E]
    fields = {f.name: torch.zeros(b * e + 1, f.width, dtype=f.dtype, device=values.device) for f in codec.fields}
    for name, data in codec.encode(values.flatten(0, 1)).items():
        fields[name][flat.flatten().to(values.device)] = data
    rows = PagedRows(fmt, tuple(fields[f.name] for f in codec.fields), rows_per_block, width, values.dtype)
    return rows, codec, tables.to(values.device)


def _qat_values(fmt: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values the model stores in this format: FP8 / FP4 round trips of random rows (exact in the codecs)."""
    x = torch.randn(*shape, generator=gen) * torch.logspace(-3, 2, shape[-2])[:, None]
    return q8_nope(x, R) if fmt == FP8_NOPE else q4_hadamard(x) if fmt == MXFP4 else x


@pytest.mark.parametrize(("fmt", "width"), [(FP8_NOPE, D), (MXFP4, IC), (PLAIN, D)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_is_the_codecs_decode(fmt: str, width: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    values = _qat_values(fmt, (2, 16, width), gen).to(dtype)
    rows, codec, tables = _store(fmt, values, 4, torch.randperm(8, generator=gen))
    flat = rows.flat_rows(tables.long(), torch.arange(16).expand(2, 16))
    decoded = decode_rows(rows, flat)
    stored = {f.name: t[flat.flatten()] for f, t in zip(codec.fields, rows.tensors, strict=True)}
    assert torch.equal(decoded.flatten(0, 1), codec.decode(stored))
    assert torch.equal(decoded, values), "the model's values survive the round trip"


def _attention_case(fmt: str, gen: torch.Generator, device: torch.device) -> tuple:
    b, h, w, e, rpb = 3, 4, 8, 24, 4
    entries = _qat_values(fmt, (b, e, D), gen)
    rows, _, tables = _store(fmt, entries, rpb, torch.randperm(b * e // rpb, generator=gen))
    window = torch.randn(b + 1, w, D, generator=gen)
    positions = torch.tensor([3, 40, 95])  # a window not yet full, then full ones
    slots = torch.tensor([2, 0, 1])
    idx = torch.tensor([[5, -1, 0, -1, -1], [23, 7, 1, 12, -1], [-1, -1, -1, -1, -1]])
    q = torch.randn(b, h, D, generator=gen)
    sink = torch.randn(h, generator=gen)
    args = (q, window, slots, positions, rows, tables, idx, sink, D**-0.5)
    move = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if isinstance(move[4], PagedRows):
        r = move[4]
        move[4] = PagedRows(r.format, tuple(t.to(device) for t in r.tensors), r.rows_per_block, r.dim, r.dtype)
    return tuple(move), entries.to(device)


@pytest.mark.parametrize("fmt", [FP8_NOPE, PLAIN])
def test_paged_attention_is_sparse_attention_over_the_rows_it_reads(fmt: str) -> None:
    (q, window, slots, positions, rows, tables, idx, sink, scale), entries = _attention_case(
        fmt, torch.Generator().manual_seed(1), torch.device("cpu")
    )
    got = lookup("paged_sparse_attention", "reference")(q, window, slots, positions, rows, tables, idx, sink, scale)
    w = window.shape[1]
    for row in range(q.shape[0]):
        t = int(positions[row])
        ring = [p % w for p in range(max(0, t - w + 1), t + 1)]
        keys = [window[int(slots[row]), s] for s in ring] + [entries[row, int(i)] for i in idx[row] if i >= 0]
        kv = torch.stack(keys)[None]
        want = lookup("sparse_attention", "reference")(
            q[row][None, None], kv, torch.arange(kv.shape[1])[None, None], sink, scale
        )
        torch.testing.assert_close(got[row], want[0, 0], atol=1e-5, rtol=1e-5)


def test_paged_attention_without_entries_reads_the_window_only() -> None:
    (q, window, slots, positions, _, tables, _, sink, scale), _ = _attention_case(
        PLAIN, torch.Generator().manual_seed(2), torch.device("cpu")
    )
    ref = lookup("paged_sparse_attention", "reference")
    assert torch.equal(
        ref(q, window, slots, positions, None, tables, None, sink, scale),
        ref(q, window, slots, positions, None, tables, torch.full((3, 2), -1), sink, scale),
    )


@pytest.mark.parametrize("fmt", [MXFP4, PLAIN])
def test_paged_indexer_is_indexer_topk_over_the_decoded_keys(fmt: str) -> None:
    gen = torch.Generator().manual_seed(3)
    b, hi, e, rpb = 3, 16, 32, 8
    keys = _qat_values(fmt, (b, e, IC), gen)
    rows, _, tables = _store(fmt, keys, rpb, torch.randperm(b * e // rpb, generator=gen))
    q, w = torch.randn(b, hi, IC, generator=gen), torch.randn(b, hi, generator=gen) * 0.1
    visible = torch.tensor([0, 13, 32])
    for topk in (4, 40):
        got = lookup("paged_indexer_topk", "reference")(q, w, rows, tables, visible, topk)
        want = lookup("indexer_topk", "reference")(q[:, None], w[:, None], keys, visible[:, None], topk)[:, 0]
        assert got.shape == (b, min(topk, e))
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("fmt", [FP8_NOPE, PLAIN])
def test_cuda_paged_attention_matches_the_reference(impls, device, fmt: str) -> None:
    ref, cuda = impls("paged_sparse_attention")
    args, _ = _attention_case(fmt, torch.Generator().manual_seed(4), device)
    torch.testing.assert_close(cuda(*args), ref(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", [MXFP4, PLAIN])
def test_cuda_paged_indexer_matches_the_reference(impls, device, fmt: str) -> None:
    ref, cuda = impls("paged_indexer_topk")
    gen = torch.Generator().manual_seed(5)
    keys = _qat_values(fmt, (2, 48, IC), gen)
    rows, _, tables = _store(fmt, keys, 16, torch.randperm(6, generator=gen))
    rows = PagedRows(rows.format, tuple(t.to(device) for t in rows.tensors), 16, IC, rows.dtype)
    q, w = torch.randn(2, 16, IC, generator=gen).to(device), (torch.randn(2, 16, generator=gen) * 0.1).to(device)
    visible = torch.tensor([48, 20], device=device)
    got = cuda(q, w, rows, tables.to(device), visible, 8)
    want = ref(q, w, rows, tables.to(device), visible, 8)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize(
    ("e_pad", "chunk", "k", "visible"),
    [(64, 16, 4, [64, 30, 0]), (256, 16, 8, [256, 200, 5]), (32, 32, 8, [32, 31, 17])],
    ids=["four-chunks", "merge-levels", "one-chunk"],
)
def test_split_topk_is_the_lower_index_top_k(device, e_pad: int, chunk: int, k: int, visible: list[int]) -> None:
    """Split-k over chunks, then merged in groups: the contract's selection, ties to the lower index included
    (scores drawn from a few values so that most picks are decided by ties)."""
    from dsv4.kernels.cuda.paged import split_topk
    from dsv4.kernels.reference._select import topk_lower_index_wins

    gen = torch.Generator().manual_seed(6)
    scores = torch.randint(0, 4, (3, e_pad), generator=gen).float() - 1.5
    scores[1, ::7] = -0.0  # -0.0 ties with +0.0
    scores[1, 3::7] = 0.0
    vis = torch.tensor(visible)
    masked = scores.masked_fill(torch.arange(e_pad) >= vis[:, None], float("-inf"))
    got = split_topk(masked.to(device), vis.to(device), k, chunk).cpu()
    want = topk_lower_index_wins(masked, k)
    want = torch.where(want < vis[:, None], want, -1)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
