"""A candidate for the decode-shaped MXFP4 grouped matmul: `tl.dot_scaled` with the weights as the MMA's M side.

The GEMV of grouped_gemv.py decodes every e2m1 code and multiplies on the CUDA cores; on paper that is ~15
instructions a weight byte at one row, more than an H200 issues per byte at full HBM bandwidth (its docstring), so
MXFP4 may stay below the 50 % roofline aim. Here the codes and their E8M0 scales go to `tl.dot_scaled` as they are
stored (two codes a byte, low nibble first, one scale per 32 columns: the OCP MX layout the op takes) and the
tokens are the MMA's N side ("swap AB": out^T [O, rows] = W [O, K] x^T [K, rows]), so a program's 128 output rows
fill the MMA's M and a few tokens pad only its N to 16. On Hopper, Triton upcasts the codes to bf16 in the
compiler's own sequence before a wgmma (no FP4 MMA before Blackwell), on Blackwell it is native.

Not the registered op: `bench/kernels_gpu.py --decode` times it beside the GEMV on the same cases
(`grouped_matmul_mxfp4_scaled`), and the dispatch changes only if it wins there. The tile schedule and the contract
are the grouped matmul's (rows past the last end come back 0, stored by the spare tiles). x must be bf16 or fp16
(`dot_scaled`'s formats). NOT RUN ON GPU HARDWARE: checked against the reference in the interpreter (fp16 x) and
compiled for sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import check_device, schedule_tile, tile_schedule

BLOCK_N = 16  # token rows per program: the MMA's smallest N
BLOCK_O = 128  # output rows per program: the MMA's M
BLOCK_K = 128  # K columns a step: 64 code bytes and 4 scales a weight row
SCALED_WARPS = 8  # 4 warps: 212-255 registers a thread, spilling without the 16-divisible arguments
_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _grouped_mxfp4_scaled_kernel(
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
    X_FORMAT: tl.constexpr,
    BN: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
):
    expert, live, rows, row_ok = schedule_tile(tile_expert_ptr, tile_first_ptr, ends_ptr, M, N_EXPERTS, BN)
    o = tl.program_id(1) * BO + tl.arange(0, BO)
    o_ok = o < N_OUT
    w_row = expert.to(tl.int64) * N_OUT + o
    acc = tl.zeros([BO, BN], dtype=tl.float32)
    for k0 in range(0, tl.where(live, K, 0), BK):
        kb = k0 // 2 + tl.arange(0, BK // 2)
        codes = tl.load(w_ptr + w_row[:, None] * (K // 2) + kb[None, :], mask=o_ok[:, None], other=0)
        group = k0 // 32 + tl.arange(0, BK // 32)
        scales = tl.load(scale_ptr + w_row[:, None] * (K // 32) + group[None, :], mask=o_ok[:, None], other=127)
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + rows[None, :] * K + k[:, None], mask=row_ok[None, :], other=0.0)
        acc = tl.dot_scaled(codes, scales, "e2m1", xt, None, X_FORMAT, acc)
    tl.store(
        out_ptr + rows[None, :] * N_OUT + o[:, None],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[None, :] & o_ok[:, None],
    )


def grouped_matmul_mxfp4_scaled(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    """`grouped_matmul_mxfp4`'s contract through `tl.dot_scaled`: x [M, K] bf16/fp16 (K a multiple of 128), weight
    I8 [E, O, K/2], scale E8M0 [E, O, K/32], group_ends [E] -> [M, O] in x.dtype."""
    check_device("grouped_matmul_mxfp4_scaled", x, weight, scale, group_ends)
    if x.dtype not in _FORMATS:
        raise ValueError(f"grouped_matmul_mxfp4_scaled: x must be bf16 or fp16 (tl.dot_scaled), got {x.dtype}")
    if scale.dtype != torch.float8_e8m0fnu:
        raise ValueError(f"grouped_matmul_mxfp4_scaled: the scales must be E8M0, got {scale.dtype}")
    m, k = x.shape
    n_experts, o = weight.shape[0], weight.shape[1]
    if k % BLOCK_K:
        raise ValueError(f"grouped_matmul_mxfp4_scaled: K = {k} is not a multiple of {BLOCK_K}")
    out = torch.empty(m, o, dtype=x.dtype, device=x.device)
    if m == 0 or o == 0:
        return out
    expert, first, n_tiles = tile_schedule(group_ends, m, BLOCK_N)
    _grouped_mxfp4_scaled_kernel[(n_tiles, triton.cdiv(o, BLOCK_O))](
        x.contiguous(),
        weight.view(torch.uint8).contiguous(),
        scale.view(torch.uint8).contiguous(),
        group_ends.contiguous(),
        expert,
        first,
        out,
        m,
        o,
        k,
        n_experts,
        X_FORMAT=_FORMATS[x.dtype],
        BN=BLOCK_N,
        BO=BLOCK_O,
        BK=BLOCK_K,
        num_warps=SCALED_WARPS,
    )
    return out
