"""Decode-shaped grouped GEMV for the packed expert weights: FP8 e4m3 with 128x128 block scales (E8M0 or F32) and
MXFP4 e2m1 (two codes a byte, low nibble = even column) with E8M0 scales per 32 columns.

At decode an expert sees a few rows (Flash, batch 1: 6 experts x 1 row; batch 64: about 200 of 256 experts, 1-2
rows each), so the expert matmul is a weight stream: every weight byte is read once and used by 1-4 rows. The
tiled `tl.dot` kernel of moe.py pads those rows to 16 and routes each decoded K step through shared memory into
the MMA. Here a program owns (a tile of ROWS rows of one expert, BLOCK_N output rows, one K split): it streams its
weight slab once in [BLOCK_N, 16-byte] vectors, decodes in registers (kernels/cuda/mx.py) and accumulates the
products on the CUDA cores in fp32: no MMA, no padding to 16 rows. The 16 bytes a thread loads are one MXFP4
scale group (32 codes) or 16 FP8 columns of one scale block, so a thread sums them before the scale, once per group.

Grid: (row tiles, output tiles, K splits). Row tiles come from the device-side schedule of the grouped matmul
(`launch.tile_schedule`, no host sync), bounded by ceil(M/ROWS) + min(E, M), so a batch of one launches a handful
of row tiles, not one per expert. K is split when the other two axes give fewer than `TARGET_PROGRAMS` programs
(the batch-1 `wo_a`: 8 groups x 32 output tiles); split partials are added by one fp32 sum over the splits (a
fixed order: the result does not depend on the launch). The schedule's spare tiles write the zero rows past the
last expert's end, so the output needs no zeroing pass.

NOT RUN ON GPU HARDWARE: tested in fp32 under Triton's interpreter and compiled for sm_90 without a GPU
(tests/unit/kernels/test_grouped_gemv.py, cuda_aot.py). Its speed, and the threshold below, are unmeasured.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, schedule_tile, tile_schedule
from dsv4.kernels.cuda.mx import e2m1_fp16_image, e8m0, scale_operand

# Dispatch: the grouped matmul takes this kernel when the average rows per (non-empty) expert, M / min(E, M), is
# at most GEMV_MAX_ROWS; above it the tiled MMA kernel's 16-row tiles are at least a quarter full. Budget on paper:
# an H200 (132 SMs x 128 lanes x 1.98 GHz) issues ~7 instructions per byte at full HBM bandwidth (4.8 TB/s). The
# GEMV spends ~6 integer/convert ops decoding an FP8 byte and ~12 an MXFP4 byte (two codes), plus ROWS (FP8) or
# 2 x ROWS (MXFP4) FMAs: FP8 fits at 1 row, MXFP4 is ALU-bound at every row count (~15 a byte at 1 row, ~20 at
# 4). Estimates from instruction counts, not measurements (no GPU yet).
GEMV_MAX_ROWS = 4
BLOCK_N = 32  # output rows per program
GROUP_BYTES = 16  # bytes a thread loads at once: one MXFP4 scale group, 16 FP8 columns
GROUPS = 8  # 16-byte groups per K step: 128 FP8 columns (one scale block) or 256 MXFP4 columns
# MXFP4 at 4 rows takes half the groups a step: at 8, ptxas for sm_90 gives it 255 registers (80 at 4; the other
# variants need 56-96 at 8)
MXFP4_ROWS4_GROUPS = 4
GEMV_WARPS = 4
TARGET_PROGRAMS = 1024  # ~8 programs per SM on a 132-SM H100/H200 before the K axis is split

_FP8, _MXFP4 = 1, 2
_X_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _pair_columns(words, X_KIND: tl.constexpr):
    """Words holding two adjacent columns of x (X_KIND 0: fp32 pairs in int64, 1: bf16 / 2: fp16 pairs in int32,
    the even column in the low half) -> (even, odd) fp32. A bf16 is the top half of its fp32."""
    if X_KIND == 0:
        even = (words & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        odd = (words >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    elif X_KIND == 1:
        even = (words << 16).to(tl.float32, bitcast=True)
        odd = (words & -65536).to(tl.float32, bitcast=True)  # 0xFFFF0000 as an int32
    else:
        even = (words & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = ((words >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _grouped_gemv_kernel(
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
    STEPS,
    SPLIT_STEPS,
    KB,
    QUANT: tl.constexpr,
    X_KIND: tl.constexpr,
    SCALE_E8M0: tl.constexpr,
    ROWS: tl.constexpr,
    BN: tl.constexpr,
    G: tl.constexpr,
    GB: tl.constexpr,
):
    """out[split, r, o] (or out[r, o] with one split) = sum over the split's K columns of x[r, k] * W[e, o, k]."""
    # a spare tile gets an empty K range below
    expert, live, r, r_ok = schedule_tile(tile_expert_ptr, tile_first_ptr, ends_ptr, M, N_EXPERTS, ROWS)
    o = tl.program_id(1) * BN + tl.arange(0, BN)
    o_ok = o < N_OUT
    split = tl.program_id(2)
    e64 = expert.to(tl.int64)
    g = tl.arange(0, G)
    j = tl.arange(0, GB)
    acc = tl.zeros([ROWS, BN, G], dtype=tl.float32)
    # K is walked in steps of G * GB bytes (a step index times a constexpr: Triton then knows the offsets are
    # 16-byte aligned and loads each thread's 16 bytes as one vector)
    first_step = split * SPLIT_STEPS
    last_step = tl.where(live, tl.minimum(first_step + SPLIT_STEPS, STEPS), first_step)
    if QUANT == 1:
        # K step = G * GB columns = one 128-column scale block; BN divides 128, so one scale per step
        sk = (K + 127) // 128
        s_row = (e64 * ((N_OUT + 127) // 128) + tl.program_id(1) * BN // 128) * sk
        for step in range(first_step, last_step):
            k0 = step * (G * GB)
            k = k0 + g[:, None] * GB + j[None, :]  # [G, GB]
            k_ok = k < K
            q = tl.load(
                w_ptr + (e64 * N_OUT + o[:, None, None]) * K + k[None, :, :],
                mask=o_ok[:, None, None] & k_ok[None, :, :],
                other=0,
            )
            s_raw = tl.load(scale_ptr + s_row + k0 // 128)
            s = e8m0(s_raw) if SCALE_E8M0 else s_raw
            # the e4m3 fp16 image times 2^8 is the value; 2^8 and the block scale go on x (R x K ops, not N x K)
            x_ok = r_ok[:, None, None] & k_ok[None, :, :]
            xs = tl.load(x_ptr + r[:, None, None] * K + k[None, :, :], mask=x_ok, other=0.0)
            xs = xs.to(tl.float32) * (s * 256.0)
            b = q.to(tl.int32)
            w = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            acc += tl.sum(xs[:, None, :, :] * w[None, :, :, :], axis=3)
    else:
        for step in range(first_step, last_step):
            kb0 = step * (G * GB)
            kb = kb0 + g[:, None] * GB + j[None, :]  # byte columns [G, GB]
            kb_ok = kb < KB
            packed = tl.load(
                w_ptr + (e64 * N_OUT + o[:, None, None]) * KB + kb[None, :, :],
                mask=o_ok[:, None, None] & kb_ok[None, :, :],
                other=0,
            ).to(tl.int32)
            grp = kb0 // GB + g  # the scale group of each 16-byte vector
            s = e8m0(
                tl.load(
                    scale_ptr + (e64 * N_OUT + o[:, None]) * (KB // GB) + grp[None, :],
                    mask=o_ok[:, None] & (grp[None, :] < KB // GB),
                    other=127,
                )
            )
            # x as one word per column pair (bf16/fp16 pairs in an int32, fp32 pairs in an int64): the word of pair
            # kb lines up with weight byte kb, one contiguous vector per group, split into even and odd columns
            words = tl.load(
                x_ptr + r[:, None, None] * KB + kb[None, :, :], mask=r_ok[:, None, None] & kb_ok[None, :, :], other=0
            )
            x_even, x_odd = _pair_columns(words, X_KIND)
            lo = e2m1_fp16_image(packed & 0xF)
            hi = e2m1_fp16_image(packed >> 4)
            # fp16 images are the values times 2^-14: the 2^14 goes on the group's sum with its scale, exactly
            part = tl.sum(x_even[:, None, :, :] * lo[None, :, :, :] + x_odd[:, None, :, :] * hi[None, :, :, :], axis=3)
            acc += (part * 16384.0) * s[None, :, :]
    result = tl.sum(acc, axis=2)
    offs = (split.to(tl.int64) * M + r[:, None]) * N_OUT + o[None, :]
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])


def gemv_rows(m: int, n_experts: int) -> int | None:
    """Rows per program of the GEMV for m rows over n_experts experts, or None when the tiled MMA kernel should
    run (more than GEMV_MAX_ROWS rows per non-empty expert on average)."""
    if m == 0 or n_experts == 0:
        return None
    average = m / min(n_experts, m)
    return block(math.ceil(average)) if average <= GEMV_MAX_ROWS else None


def gemv_groups(quant: int, rows: int) -> int:
    """16-byte groups per K step of the kernel for this format and rows per program."""
    return MXFP4_ROWS4_GROUPS if quant == _MXFP4 and rows >= 4 else GROUPS


def grouped_gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor, quant: int, rows: int
) -> torch.Tensor:
    """x [M, K] times the FP8 (quant 1) or MXFP4 (quant 2) experts of `weight` as the grouped matmul contract says,
    `rows` rows of one expert per program (see `gemv_rows`); returns [M, O] in x.dtype."""
    m, k = x.shape
    n_experts, o = weight.shape[0], weight.shape[1]
    expert, first, n_tiles = tile_schedule(ends, m, rows)
    groups = gemv_groups(quant, rows)
    step = groups * GROUP_BYTES * (2 if quant == _MXFP4 else 1)  # K columns per step
    o_tiles = triton.cdiv(o, BLOCK_N)
    steps = triton.cdiv(k, step)
    live_tiles = min(n_tiles, max(triton.cdiv(m, rows), min(n_experts, m)))
    splits = max(1, min(steps, TARGET_PROGRAMS // (live_tiles * o_tiles)))
    split_steps = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, split_steps)
    s, scale_e8m0 = scale_operand(scale)
    out = torch.empty(splits, m, o, dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    xc = x.contiguous()
    x_kind = _X_KIND[x.dtype]
    if quant == _MXFP4:  # one word per column pair (see _pair_columns)
        xc = xc.view(torch.int64 if x_kind == 0 else torch.int32)
    _grouped_gemv_kernel[(n_tiles, o_tiles, splits)](
        xc,
        weight.view(torch.uint8).contiguous(),
        s,
        ends.contiguous(),
        expert,
        first,
        out,
        m,
        o,
        k,
        n_experts,
        steps,
        split_steps,
        k // 2,  # bytes per MXFP4 weight row, an argument of its own so that Triton sees it divisible by 16
        QUANT=quant,
        X_KIND=x_kind,
        SCALE_E8M0=scale_e8m0,
        ROWS=rows,
        BN=BLOCK_N,
        G=groups,
        GB=GROUP_BYTES,
        num_warps=GEMV_WARPS,
    )
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)
