"""Triton mHC: Sinkhorn, the fused pre-mapping (norm, mixing GEMV, sigmoid gates, Sinkhorn, stream collapse),
the post-mapping and the hyper head.

Each program takes a block of token rows. The mixing weights fn [(2+n)n, n·d] stream through once per block;
the n x n residual logits are accumulated flattened ([rows, NP*NP]) and reshaped for Sinkhorn, which normalizes
rows (axis 2) and columns (axis 1) of all the block's matrices at once. n is padded to NP (a power of two, at
least 4 so that NP*NP fills a tile) and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, check_device
from dsv4.kernels.registry import register

BLOCK_N = 16  # token rows per program
BLOCK_K = 32  # flattened-stream columns per step of the mixing GEMV
# 8 warps: at 4, pre and post need 255 and 182 registers a thread (ptxas for sm_90; 102 and 147 at 8)
NUM_WARPS = 8
BLOCK_D = 128  # hidden columns per step of the stream collapse / expansion


@triton.jit
def _sinkhorn_tile(logits, valid, iters, eps):
    """logits [R, NP, NP] fp32 (ignored where not `valid`) -> comb [R, NP, NP], zero outside the n x n block."""
    x = tl.where(valid, logits, float("-inf"))
    m = tl.max(x, axis=2)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(valid, tl.exp(x - m[:, :, None]), 0.0)
    total = tl.sum(e, axis=2)
    total = tl.where(total == 0.0, 1.0, total)
    comb = tl.where(valid, e / total[:, :, None] + eps, 0.0)
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + eps)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)
    return comb


@triton.jit
def _sinkhorn_kernel(logits_ptr, out_ptr, rows, iters, eps, N_HC: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    i = tl.arange(0, NP)
    valid = (r[:, None, None] < rows) & (i[None, :, None] < N_HC) & (i[None, None, :] < N_HC)
    offs = r[:, None, None] * N_HC * N_HC + i[None, :, None] * N_HC + i[None, None, :]
    logits = tl.load(logits_ptr + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, _sinkhorn_tile(logits, valid, iters, eps), mask=valid)


def _np(n: int) -> int:
    return block(n, minimum=4)


@register("sinkhorn", "cuda")
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    check_device("sinkhorn", logits)
    x = logits.float().contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // (n * n) if n else 0
    if rows:
        _sinkhorn_kernel[(triton.cdiv(rows, BLOCK_N),)](x, out, rows, iters, eps, N_HC=n, NP=_np(n), BN=BLOCK_N)
    return out


@triton.jit
def _collapse(
    streams_ptr, out_ptr, weights, r, rows, N_HC: tl.constexpr, DIM: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr
):
    """out[r, :] = sum_j weights[r, j] * streams[r, j, :] for the block's rows."""
    i = tl.arange(0, NP)
    for d0 in range(0, DIM, BD):
        d = d0 + tl.arange(0, BD)
        ok = (r[:, None, None] < rows) & (i[None, :, None] < N_HC) & (d[None, None, :] < DIM)
        xs = tl.load(
            streams_ptr + r[:, None, None] * N_HC * DIM + i[None, :, None] * DIM + d[None, None, :], mask=ok, other=0.0
        ).to(tl.float32)
        x = tl.sum(weights[:, :, None] * xs, axis=1)
        tl.store(
            out_ptr + r[:, None] * DIM + d[None, :],
            x.to(out_ptr.dtype.element_ty),
            mask=(r[:, None] < rows) & (d[None, :] < DIM),
        )


@triton.jit
def _mhc_pre_kernel(
    streams_ptr,
    fn_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    post_ptr,
    comb_ptr,
    rows,
    iters,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    r_ok = r < rows
    width = N_HC * DIM  # flattened streams of one row
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    ij = tl.arange(0, NP * NP)
    ij_ok = (ij // NP < N_HC) & (ij % NP < N_HC)
    res_row = 2 * N_HC + (ij // NP) * N_HC + ij % NP  # fn row of residual logit (i, j)
    acc_pre = tl.zeros([BN, NP], dtype=tl.float32)
    acc_post = tl.zeros([BN, NP], dtype=tl.float32)
    acc_res = tl.zeros([BN, NP * NP], dtype=tl.float32)
    sq = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, width, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < width
        v = tl.load(streams_ptr + r[:, None] * width + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        v = v.to(tl.float32)
        sq += tl.sum(v * v, axis=1)
        m2 = i_ok[:, None] & k_ok[None, :]
        f_pre = tl.load(fn_ptr + i[:, None] * width + k[None, :], mask=m2, other=0.0).to(tl.float32)
        f_post = tl.load(fn_ptr + (N_HC + i[:, None]) * width + k[None, :], mask=m2, other=0.0).to(tl.float32)
        f_res = tl.load(
            fn_ptr + res_row[:, None] * width + k[None, :], mask=ij_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        acc_pre += tl.sum(v[:, None, :] * f_pre[None, :, :], axis=2)
        acc_post += tl.sum(v[:, None, :] * f_post[None, :, :], axis=2)
        acc_res += tl.sum(v[:, None, :] * f_res[None, :, :], axis=2)
    rstd = tl.rsqrt(sq / width + norm_eps)[:, None]
    pre = tl.sigmoid(acc_pre * rstd * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)[None, :])
    pre = tl.where(i_ok[None, :], pre + hc_eps, 0.0)
    post = 2.0 * tl.sigmoid(
        acc_post * rstd * tl.load(scale_ptr + 1) + tl.load(base_ptr + N_HC + i, mask=i_ok, other=0.0)[None, :]
    )
    logits = acc_res * rstd * tl.load(scale_ptr + 2) + tl.load(base_ptr + res_row, mask=ij_ok, other=0.0)[None, :]
    valid = r_ok[:, None, None] & i_ok[None, :, None] & i_ok[None, None, :]
    comb = _sinkhorn_tile(tl.reshape(logits, [BN, NP, NP]), valid, iters, hc_eps)
    tl.store(post_ptr + r[:, None] * N_HC + i[None, :], post, mask=r_ok[:, None] & i_ok[None, :])
    tl.store(comb_ptr + r[:, None, None] * N_HC * N_HC + i[None, :, None] * N_HC + i[None, None, :], comb, mask=valid)
    _collapse(streams_ptr, x_ptr, pre, r, rows, N_HC, DIM, NP, BD)


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
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    post = torch.empty(rows, n, dtype=torch.float32, device=streams.device)
    comb = torch.empty(rows, n, n, dtype=torch.float32, device=streams.device)
    if rows:
        _mhc_pre_kernel[(triton.cdiv(rows, BLOCK_N),)](
            streams.contiguous(),
            fn.contiguous(),
            scale.float().contiguous(),
            base.float().contiguous(),
            x,
            post,
            comb,
            rows,
            sinkhorn_iters,
            hc_eps,
            norm_eps,
            N_HC=n,
            DIM=d,
            NP=_np(n),
            BN=BLOCK_N,
            BK=BLOCK_K,
            BD=BLOCK_D,
            num_warps=NUM_WARPS,
        )
    return x, post, comb


@triton.jit
def _hc_head_kernel(
    streams_ptr,
    fn_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    rows,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    r_ok = r < rows
    width = N_HC * DIM
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    acc = tl.zeros([BN, NP], dtype=tl.float32)
    sq = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, width, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < width
        v = tl.load(streams_ptr + r[:, None] * width + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        v = v.to(tl.float32)
        sq += tl.sum(v * v, axis=1)
        f = tl.load(fn_ptr + i[:, None] * width + k[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None, :] * f.to(tl.float32)[None, :, :], axis=2)
    rstd = tl.rsqrt(sq / width + norm_eps)[:, None]
    w = tl.sigmoid(acc * rstd * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)[None, :])
    w = tl.where(i_ok[None, :], w + hc_eps, 0.0)
    _collapse(streams_ptr, x_ptr, w, r, rows, N_HC, DIM, NP, BD)


@register("hc_head", "cuda")
def hc_head(
    streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    check_device("hc_head", streams, fn, scale, base)
    rows, n, d = streams.shape
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    if rows:
        _hc_head_kernel[(triton.cdiv(rows, BLOCK_N),)](
            streams.contiguous(),
            fn.contiguous(),
            scale.float().contiguous(),
            base.float().contiguous(),
            x,
            rows,
            hc_eps,
            norm_eps,
            N_HC=n,
            DIM=d,
            NP=_np(n),
            BN=BLOCK_N,
            BK=BLOCK_K,
            BD=BLOCK_D,
            num_warps=NUM_WARPS,
        )
    return x


@triton.jit
def _mhc_post_kernel(
    y_ptr,
    streams_ptr,
    post_ptr,
    comb_ptr,
    out_ptr,
    rows,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    r_ok = r < rows
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = d < DIM
    j = tl.arange(0, NP)
    j_ok = j < N_HC
    ok = r_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptr + r[:, None] * DIM + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xs = tl.load(
        streams_ptr + r[:, None, None] * N_HC * DIM + j[None, :, None] * DIM + d[None, None, :],
        mask=r_ok[:, None, None] & j_ok[None, :, None] & d_ok[None, None, :],
        other=0.0,
    ).to(tl.float32)  # [rows, j, d]
    for k in tl.static_range(N_HC):
        comb_k = tl.load(
            comb_ptr + r[:, None] * N_HC * N_HC + j[None, :] * N_HC + k, mask=r_ok[:, None] & j_ok[None, :], other=0.0
        )  # comb[:, j, k]
        post_k = tl.load(post_ptr + r * N_HC + k, mask=r_ok, other=0.0)
        out = post_k[:, None] * y + tl.sum(comb_k[:, :, None] * xs, axis=1)
        tl.store(out_ptr + r[:, None] * N_HC * DIM + k * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@register("mhc_post", "cuda")
def mhc_post(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    check_device("mhc_post", y, streams, post, comb)
    rows, n, d = streams.shape
    s = streams.contiguous()
    out = torch.empty_like(s)
    if rows:
        _mhc_post_kernel[(triton.cdiv(rows, BLOCK_N), triton.cdiv(d, BLOCK_D))](
            y.contiguous(),
            s,
            post.float().contiguous(),
            comb.float().contiguous(),
            out,
            rows,
            N_HC=n,
            DIM=d,
            NP=_np(n),
            BN=BLOCK_N,
            BD=BLOCK_D,
            num_warps=NUM_WARPS,
        )
    return out
