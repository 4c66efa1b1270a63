"""Triton mHC: Sinkhorn, the fused pre-mapping (norm, mixing GEMV, sigmoid gates, Sinkhorn, stream collapse),
the post-mapping and the hyper head.

One program per token row for pre/head: the mixing weights fn [(2+n)n, n·d] are streamed through L2 once per
row, which is the decode shape (few rows). n streams are padded to NP (a power of two) and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, check_device
from dsv4.kernels.registry import register


@triton.jit
def _sinkhorn_tile(logits, valid, iters, eps):
    """logits [NP, NP] fp32 (masked where not `valid`) -> comb, zero outside the valid n x n block."""
    x = tl.where(valid, logits, float("-inf"))
    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(valid, tl.exp(x - m[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    total = tl.where(total == 0.0, 1.0, total)
    comb = tl.where(valid, e / total[:, None] + eps, 0.0)
    comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    return comb


@triton.jit
def _sinkhorn_kernel(logits_ptr, out_ptr, iters, eps, N_HC: tl.constexpr, NP: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, NP)
    valid = (i[:, None] < N_HC) & (i[None, :] < N_HC)
    offs = row * N_HC * N_HC + i[:, None] * N_HC + i[None, :]
    logits = tl.load(logits_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, _sinkhorn_tile(logits, valid, iters, eps), mask=valid)


@register("sinkhorn", "cuda")
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    check_device("sinkhorn", logits)
    x = logits.float().contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // (n * n) if n else 0
    if rows:
        _sinkhorn_kernel[(rows,)](x, out, iters, eps, N_HC=n, NP=block(n))
    return out


@triton.jit
def _mhc_pre_kernel(
    streams_ptr,
    fn_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    post_ptr,
    comb_ptr,
    iters,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    width = N_HC * DIM  # flattened streams of one row
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    pair_ok = i_ok[:, None] & i_ok[None, :]
    res_row = 2 * N_HC + i[:, None] * N_HC + i[None, :]  # fn rows of the residual logits, [NP, NP]
    acc_pre = tl.zeros([NP], dtype=tl.float32)
    acc_post = tl.zeros([NP], dtype=tl.float32)
    acc_res = tl.zeros([NP, NP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < width
        v = tl.load(streams_ptr + row * width + k, mask=k_ok, other=0.0).to(tl.float32)
        sq += v * v
        m2 = i_ok[:, None] & k_ok[None, :]
        f_pre = tl.load(fn_ptr + i[:, None] * width + k[None, :], mask=m2, other=0.0).to(tl.float32)
        f_post = tl.load(fn_ptr + (N_HC + i[:, None]) * width + k[None, :], mask=m2, other=0.0).to(tl.float32)
        f_res = tl.load(
            fn_ptr + res_row[:, :, None] * width + k[None, None, :],
            mask=pair_ok[:, :, None] & k_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc_pre += tl.sum(f_pre * v[None, :], axis=1)
        acc_post += tl.sum(f_post * v[None, :], axis=1)
        acc_res += tl.sum(f_res * v[None, None, :], axis=2)
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / width + norm_eps)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(acc_pre * rstd * s0 + tl.load(base_ptr + i, mask=i_ok, other=0.0)) + hc_eps
    pre = tl.where(i_ok, pre, 0.0)
    post = 2.0 * tl.sigmoid(acc_post * rstd * s1 + tl.load(base_ptr + N_HC + i, mask=i_ok, other=0.0))
    logits = acc_res * rstd * s2 + tl.load(base_ptr + res_row, mask=pair_ok, other=0.0)
    comb = _sinkhorn_tile(logits, pair_ok, iters, hc_eps)
    tl.store(post_ptr + row * N_HC + i, post, mask=i_ok)
    tl.store(comb_ptr + row * N_HC * N_HC + i[:, None] * N_HC + i[None, :], comb, mask=pair_ok)
    for d0 in range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DIM
        xs = tl.load(
            streams_ptr + row * width + i[:, None] * DIM + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        x = tl.sum(pre[:, None] * xs, axis=0)
        tl.store(x_ptr + row * DIM + d, x.to(x_ptr.dtype.element_ty), mask=d_ok)


@register("mhc_pre", "cuda")
def mhc_pre(
    streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("mhc_pre", streams, fn, scale, base)
    rows, n, d = streams.shape
    s = streams.contiguous()
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    post = torch.empty(rows, n, dtype=torch.float32, device=streams.device)
    comb = torch.empty(rows, n, n, dtype=torch.float32, device=streams.device)
    if rows:
        _mhc_pre_kernel[(rows,)](
            s,
            fn.contiguous(),
            scale.float().contiguous(),
            base.float().contiguous(),
            x,
            post,
            comb,
            sinkhorn_iters,
            hc_eps,
            norm_eps,
            N_HC=n,
            DIM=d,
            NP=block(n),
            BLOCK_K=block(n * d, maximum=256),
            BLOCK_D=block(d, maximum=512),
        )
    return x, post, comb


@triton.jit
def _hc_head_kernel(
    streams_ptr,
    fn_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    width = N_HC * DIM
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    acc = tl.zeros([NP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < width
        v = tl.load(streams_ptr + row * width + k, mask=k_ok, other=0.0).to(tl.float32)
        sq += v * v
        f = tl.load(fn_ptr + i[:, None] * width + k[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(f.to(tl.float32) * v[None, :], axis=1)
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / width + norm_eps)
    w = tl.sigmoid(acc * rstd * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)) + hc_eps
    w = tl.where(i_ok, w, 0.0)
    for d0 in range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DIM
        xs = tl.load(
            streams_ptr + row * width + i[:, None] * DIM + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        tl.store(x_ptr + row * DIM + d, tl.sum(w[:, None] * xs, axis=0).to(x_ptr.dtype.element_ty), mask=d_ok)


@register("hc_head", "cuda")
def hc_head(
    streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    check_device("hc_head", streams, fn, scale, base)
    rows, n, d = streams.shape
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    if rows:
        _hc_head_kernel[(rows,)](
            streams.contiguous(),
            fn.contiguous(),
            scale.float().contiguous(),
            base.float().contiguous(),
            x,
            hc_eps,
            norm_eps,
            N_HC=n,
            DIM=d,
            NP=block(n),
            BLOCK_K=block(n * d, maximum=256),
            BLOCK_D=block(d, maximum=512),
        )
    return x


@triton.jit
def _mhc_post_kernel(
    y_ptr,
    streams_ptr,
    post_ptr,
    comb_ptr,
    out_ptr,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    comb = tl.load(
        comb_ptr + row * N_HC * N_HC + i[:, None] * N_HC + i[None, :], mask=i_ok[:, None] & i_ok[None, :], other=0.0
    )  # [j, k]
    post = tl.load(post_ptr + row * N_HC + i, mask=i_ok, other=0.0)
    y = tl.load(y_ptr + row * DIM + d, mask=d_ok, other=0.0).to(tl.float32)
    offs = row * N_HC * DIM + i[:, None] * DIM + d[None, :]
    ok = i_ok[:, None] & d_ok[None, :]
    xs = tl.load(streams_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # [j, d]
    mixed = tl.sum(comb[:, :, None] * xs[:, None, :], axis=0)  # [k, d]
    out = post[:, None] * y[None, :] + mixed
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@register("mhc_post", "cuda")
def mhc_post(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    check_device("mhc_post", y, streams, post, comb)
    rows, n, d = streams.shape
    s = streams.contiguous()
    out = torch.empty_like(s)
    if rows:
        blk = block(d, maximum=256)
        _mhc_post_kernel[(rows, triton.cdiv(d, blk))](
            y.contiguous(),
            s,
            post.float().contiguous(),
            comb.float().contiguous(),
            out,
            N_HC=n,
            DIM=d,
            NP=block(n),
            BLOCK_D=blk,
        )
    return out
