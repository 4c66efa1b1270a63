"""Triton mHC (Sinkhorn, fused pre-mapping, post-mapping, hyper head) vs the reference (fp32)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n", [4, 3, 1])
@pytest.mark.parametrize("iters", [1, 20])
def test_sinkhorn(impls, device, n, iters):
    ref, cuda = impls("sinkhorn")
    torch.manual_seed(0)
    logits = torch.randn(7, n, n, device=device) * 4
    out = cuda(logits, iters, 1e-6)
    torch.testing.assert_close(out, ref(logits, iters, 1e-6), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-2), torch.ones(7, n, device=device), atol=1e-3, rtol=0)


def _hc_params(n: int, d: int, outputs: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    fn = torch.randn(outputs, n * d, device=device) * 0.1
    return fn, torch.randn(3 if outputs > n else 1, device=device), torch.randn(outputs, device=device)


@pytest.mark.parametrize(
    ("rows", "n", "d"), [(5, 4, 64), (3, 3, 40), (2, 4, 300), (0, 4, 16), (1, 4, 4096), (20, 4, 4096)]
)
def test_mhc_pre(impls, device, rows, n, d):
    ref, cuda = impls("mhc_pre")
    torch.manual_seed(1)
    streams = torch.randn(rows, n, d, device=device)
    fn, scale, base = _hc_params(n, d, (2 + n) * n, device)
    got = cuda(streams, fn, scale, base, 20, 1e-6, 1e-6)
    want = ref(streams, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("rows", "n", "d"), [(4, 4, 64), (3, 3, 37), (0, 4, 8), (1, 4, 4096), (20, 4, 4096)])
def test_hc_head(impls, device, rows, n, d):
    ref, cuda = impls("hc_head")
    torch.manual_seed(2)
    streams = torch.randn(rows, n, d, device=device)
    fn, scale, base = _hc_params(n, d, n, device)
    torch.testing.assert_close(
        cuda(streams, fn, scale, base, 1e-6, 1e-6), ref(streams, fn, scale, base, 1e-6, 1e-6), atol=2e-5, rtol=1e-4
    )


def test_mix_plan_fills_the_gpu_at_decode_batches():
    from dsv4.kernels.cuda.mhc import MAX_SPLIT_COLS, MIX_PROGRAMS, MIX_TILE, mix_plan

    for rows in (1, 2, 7, 16, 64, 500):
        bn, bk, split = mix_plan(rows, 4 * 4096, 24)
        assert bn * 32 * bk <= MIX_TILE and split % bk == 0 and split <= MAX_SPLIT_COLS
        programs = -(-rows // bn) * -(-4 * 4096 // split)
        assert programs >= MIX_PROGRAMS or split == bk, (rows, bn, bk, split)
    assert mix_plan(1, 4 * 4096, 24) == (1, 128, 128)  # batch 1: 128 programs of one row
    assert mix_plan(64, 4 * 4096, 24) == (16, 32, 256)  # batch 64: 4 row blocks x 64 splits


@pytest.mark.parametrize(("rows", "n", "d"), [(4, 4, 64), (3, 3, 300), (0, 4, 8)])
def test_mhc_post(impls, device, rows, n, d):
    ref, cuda = impls("mhc_post")
    torch.manual_seed(3)
    y, streams = torch.randn(rows, d, device=device), torch.randn(rows, n, d, device=device)
    post, comb = torch.rand(rows, n, device=device) * 2, torch.rand(rows, n, n, device=device)
    torch.testing.assert_close(cuda(y, streams, post, comb), ref(y, streams, post, comb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rows", "n", "d"), [(5, 4, 64), (3, 3, 40), (2, 4, 300), (0, 4, 16), (1, 4, 4096), (20, 4, 4096)]
)
def test_mhc_post_pre(impls, device, rows, n, d):
    """The fused boundary equals the reference's post then pre: the streams exactly as the post kernel writes
    them, the pre-mapping to fp32 rounding (its mixing sums in another order)."""
    ref, cuda = impls("mhc_post_pre")
    _, post_cuda = impls("mhc_post")
    torch.manual_seed(4)
    y, streams = torch.randn(rows, d, device=device), torch.randn(rows, n, d, device=device)
    post, comb = torch.rand(rows, n, device=device) * 2, torch.rand(rows, n, n, device=device)
    fn, scale, base = _hc_params(n, d, (2 + n) * n, device)
    got = cuda(y, streams, post, comb, fn, scale, base, 20, 1e-6, 1e-6)
    want = ref(y, streams, post, comb, fn, scale, base, 20, 1e-6, 1e-6)
    assert torch.equal(got[0], post_cuda(y, streams, post, comb))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_post_mix_plan_tiles_the_columns_and_fills_the_gpu():
    from dsv4.kernels.cuda.mhc import MAX_SPLIT_COLS, MIX_PROGRAMS, POST_MIX_TILE, post_mix_plan

    for n in (1, 3, 4, 6):
        for rows in (1, 2, 7, 16, 64, 500):
            bn, bk, split = post_mix_plan(rows, 4096, n, 24)
            # splits must tile the columns (powers of two, split a multiple of the step) or a column is summed twice
            assert split & (split - 1) == 0 and bk & (bk - 1) == 0 and split % bk == 0
            assert bn * 32 * bk <= POST_MIX_TILE and n * split <= MAX_SPLIT_COLS
            programs = -(-rows // bn) * -(-4096 // split)
            assert programs >= MIX_PROGRAMS or split == bk, (n, rows, bn, bk, split)
    assert post_mix_plan(1, 4096, 4, 24) == (1, 16, 16)  # batch 1: 256 programs of one row
    assert post_mix_plan(64, 4096, 4, 24) == (16, 16, 64)  # batch 64: 4 row blocks x 64 splits
