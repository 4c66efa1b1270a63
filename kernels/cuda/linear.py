"""Triton projection over a weight kept as stored: FP8 e4m3 with 128x128 block scales decoded in the kernel (the
block-scaled FP8 GEMM of the attention, shared-expert and MTP projections), or a float weight whose product the
caller wants in a wider dtype than the activations (fp32 logits, router and compressor projections).

A float weight in the activations' dtype with an output in that dtype is cuBLAS's case (`F.linear`). Tiles:
BLOCK_M rows of x by BLOCK_O rows of the weight, K in steps of BLOCK_K; the FP8 scale is read once per 128-wide
K block and row block, so BLOCK_K divides 128. NOT RUN ON GPU HARDWARE: interpreter-tested in fp32 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import MIN_DOT, block, check_device, dot_precision
from dsv4.kernels.cuda.mx import e8m0, scale_operand
from dsv4.kernels.registry import register

# K step and warps: at 16 x 64 x 64 tiles 4 warps need 211 / 226 registers a thread on sm_90 (float / FP8, ptxas
# -v of kernels/cuda/aot.py), 8 warps 123 / 158
LINEAR_BLOCK_K = 64
LINEAR_WARPS = 8


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    out_ptr,
    M,
    N_OUT,
    K,
    QUANT: tl.constexpr,
    SCALE_E8M0: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < M
    o_ok = o < N_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    sk = (K + 127) // 128
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + o[:, None] * K + k[None, :], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        if QUANT:
            s_off = (o // 128) * sk + k0 // 128  # one K block per step: BLOCK_K divides 128
            if SCALE_E8M0:
                s = e8m0(tl.load(scale_ptr + s_off, mask=o_ok, other=127))
            else:
                s = tl.load(scale_ptr + s_off, mask=o_ok, other=1.0)
            w = w * s[:, None]
        acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision=PRECISION)
    tl.store(
        out_ptr + rows[:, None] * N_OUT + o[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & o_ok[None, :],
    )


@register("linear", "cuda")
def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype | None
) -> torch.Tensor:
    check_device("linear", x, weight, scale)
    out_dt = out_dtype or x.dtype
    if scale is None and weight.dtype == x.dtype == out_dt:
        return F.linear(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    o = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, o, dtype=out_dt, device=x.device)
    if m and o:
        s, scale_e8m0 = scale_operand(scale) if scale is not None else (None, False)
        block_m = MIN_DOT if m <= 16 else (32 if m <= 32 else 64)
        block_o = 64
        _linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(o, block_o))](
            x2,
            weight.contiguous(),
            s if s is not None else x2,
            out,
            m,
            o,
            k,
            QUANT=scale is not None,
            SCALE_E8M0=scale_e8m0,
            BLOCK_M=block_m,
            BLOCK_O=block_o,
            BLOCK_K=block(k, minimum=MIN_DOT, maximum=LINEAR_BLOCK_K),
            PRECISION=dot_precision(x.dtype),
            num_warps=LINEAR_WARPS,
        )
    return out.view(*lead, o)
