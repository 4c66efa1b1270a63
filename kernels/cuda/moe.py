"""Triton MoE router (sqrtsoftplus + biased top-k, or hash rows) and grouped expert matmul with optional
in-kernel dequantization of FP8 e4m3 (128x128 block scales) or MXFP4 e2m1 (per-32 E8M0 scales) weights.

The grouped matmul runs a tile schedule computed on the device without a host sync (`launch.tile_schedule`);
the spare tiles of its upper bound store the zero rows past the last expert's end. Packed weights with a few rows
per expert on average (decode) go to the weight-streaming GEMV of grouped_gemv.py instead (threshold there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.grouped_gemv import gemv_rows, grouped_gemv
from dsv4.kernels.cuda.launch import MIN_DOT, block, check_device, dot_precision, schedule_tile, tile_schedule
from dsv4.kernels.cuda.mx import e2m1, e8m0, scale_operand
from dsv4.kernels.registry import register

# K step and warps of the grouped matmul: with 64 x 4 the MXFP4 dequantizing variant spills on sm_90 (ptxas);
# 32 x 8 needs 80 / 104 / 119 registers a thread (plain / FP8 / MXFP4)
GROUPED_BLOCK_K = 32
GROUPED_WARPS = 8

_PLAIN, _FP8, _MXFP4 = 0, 1, 2  # grouped_gemv.py takes the same codes


@triton.jit
def _sqrtsoftplus(x):
    # softplus = max(x, 0) + log1p(exp(-|x|)); Triton has no log1p: log(u) * t / (u - 1) with u = 1 + t
    # cancels the rounding of u (Goldberg), where a plain log(1 + t) loses digits for small t
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * t / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.sqrt(tl.maximum(x, 0.0) + log1p)


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    hash_ptr,
    w_ptr,
    idx_ptr,
    rows,
    E,
    route_scale,
    TOPK: tl.constexpr,
    HASH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    slot = tl.arange(0, BLOCK_K)
    ok = r_ok[:, None] & (slot[None, :] < TOPK)
    if HASH:
        chosen = tl.load(hash_ptr + r[:, None] * TOPK + slot[None, :], mask=ok, other=0)
    else:
        e = tl.arange(0, BLOCK_E)
        e_ok = r_ok[:, None] & (e[None, :] < E)
        logits = tl.load(logits_ptr + r[:, None] * E + e[None, :], mask=e_ok, other=0.0)
        bias = tl.load(bias_ptr + e, mask=e < E, other=0.0)[None, :]
        biased = tl.where(e_ok, _sqrtsoftplus(logits) + bias, float("-inf"))
        chosen = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int64)
        for i in range(TOPK):
            best = tl.argmax(biased, axis=1)
            chosen = tl.where(slot[None, :] == i, best.to(tl.int64)[:, None], chosen)
            biased = tl.where(e[None, :] == best[:, None], float("-inf"), biased)
    score = _sqrtsoftplus(tl.load(logits_ptr + r[:, None] * E + chosen, mask=ok, other=0.0))
    score = tl.where(ok, score, 0.0)
    total = tl.sum(score, axis=1)
    weights = score / tl.where(total == 0.0, 1.0, total)[:, None] * route_scale
    tl.store(w_ptr + r[:, None] * TOPK + slot[None, :], weights, mask=ok)
    tl.store(idx_ptr + r[:, None] * TOPK + slot[None, :], chosen.to(tl.int64), mask=ok)


@register("route", "cuda")
def route(
    logits: torch.Tensor,
    topk: int,
    route_scale: float,
    bias: torch.Tensor | None,
    hash_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if (bias is None) == (hash_idx is None):
        raise ValueError("route: pass exactly one of bias (learned routing) and hash_idx (hash routing)")
    check_device("route", logits, bias, hash_idx)
    n, e = logits.shape
    k = hash_idx.shape[1] if hash_idx is not None else topk
    lg = logits.float().contiguous()
    weights = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    if n and k:
        block_e = block(e)
        block_r = block(n, maximum=max(1, 4096 // block_e))
        _route_kernel[(triton.cdiv(n, block_r),)](
            lg,
            bias.float().contiguous() if bias is not None else lg,
            hash_idx.to(torch.int64).contiguous() if hash_idx is not None else idx,
            weights,
            idx,
            n,
            e,
            route_scale,
            TOPK=k,
            HASH=hash_idx is not None,
            BLOCK_R=block_r,
            BLOCK_E=block_e,
            BLOCK_K=block(k),
        )
    return weights, idx


@triton.jit
def _grouped_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    ends_ptr,
    tile_expert_ptr,
    tile_first_ptr,
    out_ptr,
    M,
    N_OUT,
    K,
    N_EXPERTS,
    QUANT: tl.constexpr,
    SCALE_E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    expert, live, rows, row_ok = schedule_tile(tile_expert_ptr, tile_first_ptr, ends_ptr, M, N_EXPERTS, BLOCK_M)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for k0 in range(0, tl.where(live, K, 0), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = o_ok[:, None] & k_ok[None, :]
        if QUANT == 0:
            w = tl.load(w_ptr + (expert * N_OUT + o[:, None]) * K + k[None, :], mask=w_ok, other=0.0).to(tl.float32)
            acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PRECISION)
        elif QUANT == 1:
            # BLOCK_O and BLOCK_K divide 128: the tile lies in one 128x128 scale block, whose scale multiplies the
            # tile's product once (e4m3 codes are exact in bf16, so the MMA takes them unscaled)
            q = tl.load(w_ptr + (expert * N_OUT + o[:, None]) * K + k[None, :], mask=w_ok, other=0.0).to(tl.float32)
            s_off = (expert * ((N_OUT + 127) // 128) + tl.program_id(1) * BLOCK_O // 128) * (
                (K + 127) // 128
            ) + k0 // 128
            s_raw = tl.load(scale_ptr + s_off)
            s = e8m0(s_raw) if SCALE_E8M0 else s_raw
            acc += tl.dot(a, tl.trans(q.to(a.dtype)), input_precision=PRECISION) * s
        else:
            # BLOCK_K is 32 (K is a multiple of 32): one E8M0 scale per output row and step, applied to the product
            packed = tl.load(w_ptr + (expert * N_OUT + o[:, None]) * (K // 2) + k[None, :] // 2, mask=w_ok, other=0)
            code = (packed.to(tl.int32) >> ((k[None, :] % 2) * 4)) & 0xF
            s = e8m0(tl.load(scale_ptr + (expert * N_OUT + o) * (K // 32) + k0 // 32, mask=o_ok, other=127))
            acc += tl.dot(a, tl.trans(e2m1(code).to(a.dtype)), input_precision=PRECISION) * s[None, :]
    tl.store(
        out_ptr + rows[:, None] * N_OUT + o[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & o_ok[None, :],
    )


def _grouped(
    op: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, ends: torch.Tensor, quant: int
) -> torch.Tensor:
    check_device(op, x, weight, scale, ends)
    m, k = x.shape
    n_experts, o = weight.shape[0], weight.shape[1]
    gemv = gemv_rows(m, n_experts) if o else None
    if scale is not None and gemv is not None:  # packed weights, a few rows per expert: grouped_gemv.py
        return grouped_gemv(x, weight, scale, ends, quant, gemv)
    out = torch.empty(m, o, dtype=x.dtype, device=x.device)  # every row is stored, rows past the last end as 0
    if m == 0 or o == 0:
        return out
    block_m = MIN_DOT if m <= 256 else 64
    expert, first, n_tiles = tile_schedule(ends, m, block_m)
    s, scale_e8m0 = scale_operand(scale) if scale is not None else (None, False)
    w = weight.view(torch.uint8) if quant == _MXFP4 else weight
    block_o = block(o, minimum=MIN_DOT, maximum=64)
    _grouped_matmul_kernel[(n_tiles, triton.cdiv(o, block_o))](
        x.contiguous(),
        w.contiguous(),
        s if s is not None else x,
        ends.contiguous(),
        expert,
        first,
        out,
        m,
        o,
        k,
        n_experts,
        QUANT=quant,
        SCALE_E8M0=scale_e8m0,
        BLOCK_M=block_m,
        BLOCK_O=block_o,
        BLOCK_K=block(k, minimum=MIN_DOT, maximum=GROUPED_BLOCK_K),
        PRECISION=dot_precision(x.dtype),
        num_warps=GROUPED_WARPS,
    )
    return out


@register("grouped_matmul", "cuda")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    return _grouped("grouped_matmul", x, weight, None, group_ends, _PLAIN)


@register("grouped_matmul_fp8", "cuda")
def grouped_matmul_fp8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return _grouped("grouped_matmul_fp8", x, weight, scale, group_ends, _FP8)


@register("grouped_matmul_mxfp4", "cuda")
def grouped_matmul_mxfp4(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return _grouped("grouped_matmul_mxfp4", x, weight, scale, group_ends, _MXFP4)
