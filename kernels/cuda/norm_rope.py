"""Triton RMSNorm, interleaved partial RoPE (and its inverse), their fusion, and clamped SwiGLU.

One program per block of rows (about 4K values). RoPE partners (2i, 2i+1) are read a second time from memory rather than
shuffled in registers: the row is in L1, and it keeps the kernel one plain vector program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, check_device
from dsv4.kernels.registry import register


@triton.jit
def _norm_rope_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    rows,
    heads,
    eps,
    D: tl.constexpr,
    HALF_R: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ROPE: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows * D can pass 2^31
    d = tl.arange(0, BLOCK_D)
    inside = (r[:, None] < rows) & (d[None, :] < D)
    base = r[:, None] * D
    x = tl.load(x_ptr + base + d[None, :], mask=inside, other=0.0).to(tl.float32)
    rstd = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * rstd[:, None]
        if HAS_WEIGHT:
            x = x * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        first = D - 2 * HALF_R
        rel = d - first
        odd = rel % 2
        partner = d + 1 - 2 * odd
        rotated = inside & (d[None, :] >= first)
        xp = tl.load(x_ptr + base + partner[None, :], mask=rotated, other=0.0).to(tl.float32)
        if NORM:
            xp = xp * rstd[:, None]
            if HAS_WEIGHT:
                xp = xp * tl.load(w_ptr + partner, mask=(d < D) & (d >= first), other=0.0).to(tl.float32)[None, :]
        angle = (r // heads)[:, None] * HALF_R + rel[None, :] // 2
        c = tl.load(cos_ptr + angle, mask=rotated, other=1.0)
        s = tl.load(sin_ptr + angle, mask=rotated, other=0.0)
        if INVERSE:
            s = -s
        # first of a pair: x*c - x_partner*s; second: x*c + x_partner*s
        sign = tl.where(odd == 1, 1.0, -1.0)[None, :]
        x = tl.where(rotated, x * c + sign * xp * s, x)
    tl.store(out_ptr + base + d[None, :], x.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    norm: bool,
    inverse: bool = False,
) -> torch.Tensor:
    check_device(op, x, weight, cos, sin)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    d = x.shape[-1]
    rows = xc.numel() // d if d else 0
    if rows == 0:
        return out
    half_r, heads = 0, 1
    if cos is not None:
        assert sin is not None
        half_r = cos.shape[-1]
        heads = rows // (cos.shape[0] * cos.shape[1])
        cos, sin = cos.contiguous().float(), sin.contiguous().float()
    w = weight.contiguous() if weight is not None else None
    block_d = block(d)
    block_r = block(rows, maximum=max(1, 4096 // block_d))
    _norm_rope_kernel[(triton.cdiv(rows, block_r),)](
        xc,
        w if w is not None else xc,
        cos if cos is not None else xc,
        sin if sin is not None else xc,
        out,
        rows,
        heads,
        eps,
        D=d,
        HALF_R=half_r,
        NORM=norm,
        HAS_WEIGHT=w is not None,
        ROPE=cos is not None,
        INVERSE=inverse,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )
    return out


@register("rms_norm", "cuda")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch("rms_norm", x, weight, eps, None, None, norm=True)


@register("rope", "cuda")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _launch("rope", x, None, 0.0, cos, sin, norm=False, inverse=inverse)


@register("rms_norm_rope", "cuda")
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return _launch("rms_norm_rope", x, weight, eps, cos, sin, norm=True)


@triton.jit
def _swiglu_kernel(
    gate_ptr, up_ptr, scale_ptr, out_ptr, total, inter, limit, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    g = tl.minimum(tl.load(gate_ptr + offs, mask=inside, other=0.0).to(tl.float32), limit)
    u = tl.load(up_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g * tl.sigmoid(g) * u
    if HAS_SCALE:
        h = h * tl.load(scale_ptr + offs // inter, mask=inside, other=0.0)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=inside)


@register("swiglu", "cuda")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, row_scale: torch.Tensor | None) -> torch.Tensor:
    check_device("swiglu", gate, up, row_scale)
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    total = g.numel()
    if total == 0:
        return out
    scale = row_scale.contiguous().float() if row_scale is not None else None
    blk = 1024
    _swiglu_kernel[(triton.cdiv(total, blk),)](
        g, u, scale if scale is not None else g, out, total, g.shape[-1], limit, HAS_SCALE=scale is not None, BLOCK=blk
    )
    return out
