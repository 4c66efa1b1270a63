"""Triton mHC: Sinkhorn, the pre-mapping (norm, mixing GEMV, sigmoid gates, Sinkhorn, stream collapse), the
post-mapping and the hyper head.

The pre-mapping and the hyper head run in two kernels. The mixing GEMV (fn [outputs, n·d] times each row's
flattened streams, and the rows' sums of squares for the RMS norm) is split over the n·d columns: a program per
(block of rows, block of columns) writes partial sums, so a decode batch of a few rows still spreads over the GPU
(one program per block of rows streamed all of fn alone: 4 programs for 64 rows). `mix_plan` sizes the blocks by
the rows: a batch of one gets 1-row programs over 128-column splits, not 16-row ones over 512. The second kernel,
a program per (block of rows, block of hidden columns), adds the partials up (SC splits a load), applies the norm
and the gates, runs Sinkhorn, and collapses its columns of the streams. The n x n residual logits are handled
flattened ([rows, NP*NP]) and reshaped for Sinkhorn, which normalizes rows (axis 2) and columns (axis 1) of all the
block's matrices at once. n is padded to NP (a power of two, at least 4 so that NP*NP fills a tile) and masked.

`mhc_post_pre`, the boundary between two sub-layers, replaces the post kernel and the next pre's mixing GEMV by one
kernel: a program per (block of rows, block of hidden columns) writes the new streams of its columns and, from the
values it just rounded and stored, the next mixing GEMV's partial sums over those columns of all n streams; the
finishing kernel is the pre-mapping's. Per boundary that saves one launch and one read of the streams.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, check_device
from dsv4.kernels.registry import register

BLOCK_N = 16  # token rows per program (at most: a decode batch of fewer rows gets a smaller power of two)
# 8 warps: at 4, pre and post need 255 and 182 registers a thread (ptxas for sm_90; 102 and 147 at 8)
NUM_WARPS = 8
BLOCK_D = 128  # hidden columns per step of the stream collapse / expansion
# The mixing GEMV's [rows, outputs, columns] product tile per step: at most 16 x 32 x 32 elements (64 a thread at
# 8 warps), so fewer rows take wider column steps
MIX_TILE = 16 * 32 * 32
MIX_PROGRAMS = 256  # split the columns until (row blocks x splits) reaches this: ~2 programs per SM of an H200
MAX_SPLIT_COLS = 512
# The fused post + mixing kernel's product tile: half the mixing GEMV's (at 16 x 32 x 32 ptxas gave it 255
# registers a thread at 8 warps, with the stream tile and the n unrolled outputs beside it)
POST_MIX_TILE = MIX_TILE // 2
MIN_POST_COLS = 16  # hidden columns per step of the fused post + mixing kernel, at least (32-byte bf16 loads)
SUM_TILE = 4096  # elements of one [rows, splits, columns] load when the finishing kernels add the partials up


def mix_plan(rows: int, width: int, outputs: int) -> tuple[int, int, int]:
    """(rows per program, columns per step, columns per split) of the split mixing GEMV over `width` columns.
    Decode batches are small, so the split is what fills the GPU: at batch 1 (width 16,384) 128 programs of 128
    columns, at batch 64 four row blocks x 64 splits of 256 columns."""
    bn = block(rows, maximum=BLOCK_N)
    bk = min(MIX_TILE // (bn * block(outputs, minimum=4)), 128)
    row_blocks = triton.cdiv(rows, bn)
    split = triton.next_power_of_2(triton.cdiv(width, triton.cdiv(MIX_PROGRAMS, row_blocks)))
    return bn, bk, max(bk, min(split, MAX_SPLIT_COLS))


def post_mix_plan(rows: int, dim: int, n: int, outputs: int) -> tuple[int, int, int]:
    """(rows per program, hidden columns per step, hidden columns per split) of the fused post + mixing kernel,
    whose program covers its hidden columns in all n streams. Sized like `mix_plan`: at batch 1 (d 4,096) 256
    programs of 16 columns, at batch 64 four row blocks x 64 splits of 64 columns (four steps of 16)."""
    bn = block(rows, maximum=BLOCK_N)
    row_blocks = triton.cdiv(rows, bn)
    split = triton.next_power_of_2(triton.cdiv(dim, triton.cdiv(MIX_PROGRAMS, row_blocks)))
    widest = triton.next_power_of_2(MAX_SPLIT_COLS // n + 1) // 2  # a power of two: splits tile the columns
    split = max(MIN_POST_COLS, min(split, widest))
    bk = max(MIN_POST_COLS, min(POST_MIX_TILE // (bn * block(outputs, minimum=4)), 128, split))
    return bn, bk, split


def _sum_chunk(bn: int, splits: int, bo: int) -> int:
    """Splits added per load by the finishing kernels (a power of two; the tile is at most SUM_TILE)."""
    return max(1, min(block(splits), SUM_TILE // (bn * bo)))


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
def _mix_partial_kernel(
    streams_ptr,
    fn_ptr,
    part_ptr,
    sq_ptr,
    rows,
    OUT: tl.constexpr,
    WIDTH: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Partial mixing GEMV over the columns [split * SPLIT, (split + 1) * SPLIT) of the flattened streams:
    part[split, r, o] = sum_k fn[o, k] * v[r, k] and sq[split, r] = sum_k v[r, k]^2 (fp32)."""
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    r_ok = r < rows
    o = tl.arange(0, BO)
    o_ok = o < OUT
    acc = tl.zeros([BN, BO], dtype=tl.float32)
    sq = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, SPLIT, BK):
        k = split * SPLIT + k0 + tl.arange(0, BK)
        k_ok = k < WIDTH
        v = tl.load(streams_ptr + r[:, None] * WIDTH + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        v = v.to(tl.float32)
        sq += tl.sum(v * v, axis=1)
        f = tl.load(fn_ptr + o[:, None] * WIDTH + k[None, :], mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None, :] * f.to(tl.float32)[None, :, :], axis=2)
    base = split.to(tl.int64) * rows
    tl.store(part_ptr + (base + r[:, None]) * BO + o[None, :], acc, mask=r_ok[:, None])
    tl.store(sq_ptr + base + r, sq, mask=r_ok)


@triton.jit
def _summed(part_ptr, sq_ptr, r, r_ok, cols, cols_ok, rows, splits, BO: tl.constexpr, SC: tl.constexpr):
    """The partials of `_mix_partial_kernel` added over the splits: (mix [len(r), len(cols)], sum of squares).
    SC splits a load (a [rows, SC, cols] tile), so the loop has splits / SC dependent steps, not splits."""
    acc = tl.zeros([r.shape[0], cols.shape[0]], dtype=tl.float32)
    sq = tl.zeros([r.shape[0]], dtype=tl.float32)
    for s0 in range(0, splits, SC):
        s = s0 + tl.arange(0, SC)
        s_ok = s < splits
        row = s[None, :].to(tl.int64) * rows + r[:, None]  # [len(r), SC]
        ok = r_ok[:, None] & s_ok[None, :]
        acc += tl.sum(
            tl.load(
                part_ptr + row[:, :, None] * BO + cols[None, None, :],
                mask=ok[:, :, None] & cols_ok[None, None, :],
                other=0.0,
            ),
            axis=1,
        )
        sq += tl.sum(tl.load(sq_ptr + row, mask=ok, other=0.0), axis=1)
    return acc, sq


@triton.jit
def _collapse_block(streams_ptr, out_ptr, weights, r, r_ok, d, N_HC: tl.constexpr, DIM: tl.constexpr, NP: tl.constexpr):
    """out[r, d] = sum_j weights[r, j] * streams[r, j, d] for one block of rows and hidden columns."""
    i = tl.arange(0, NP)
    d_ok = d < DIM
    ok = r_ok[:, None, None] & (i[None, :, None] < N_HC) & d_ok[None, None, :]
    xs = tl.load(
        streams_ptr + r[:, None, None] * N_HC * DIM + i[None, :, None] * DIM + d[None, None, :], mask=ok, other=0.0
    ).to(tl.float32)
    x = tl.sum(weights[:, :, None] * xs, axis=1)
    tl.store(
        out_ptr + r[:, None] * DIM + d[None, :], x.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :]
    )


@triton.jit
def _mhc_pre_finish_kernel(
    part_ptr,
    sq_ptr,
    streams_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    post_ptr,
    comb_ptr,
    rows,
    splits,
    iters,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    SC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    r_ok = r < rows
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    ij = tl.arange(0, NP * NP)
    ij_ok = (ij // NP < N_HC) & (ij % NP < N_HC)
    res_col = 2 * N_HC + (ij // NP) * N_HC + ij % NP  # fn row of residual logit (i, j)
    acc_pre, sq = _summed(part_ptr, sq_ptr, r, r_ok, i, i_ok, rows, splits, BO, SC)
    acc_post, _ = _summed(part_ptr, sq_ptr, r, r_ok, N_HC + i, i_ok, rows, splits, BO, SC)
    acc_res, _ = _summed(part_ptr, sq_ptr, r, r_ok, res_col, ij_ok, rows, splits, BO, SC)
    rstd = tl.rsqrt(sq / (N_HC * DIM) + norm_eps)[:, None]
    pre = tl.sigmoid(acc_pre * rstd * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)[None, :])
    pre = tl.where(i_ok[None, :], pre + hc_eps, 0.0)
    _collapse_block(streams_ptr, x_ptr, pre, r, r_ok, tl.program_id(1) * BD + tl.arange(0, BD), N_HC, DIM, NP)
    if tl.program_id(1) == 0:  # one program per block of rows stores the gates and the mixing matrix
        post = 2.0 * tl.sigmoid(
            acc_post * rstd * tl.load(scale_ptr + 1) + tl.load(base_ptr + N_HC + i, mask=i_ok, other=0.0)[None, :]
        )
        logits = acc_res * rstd * tl.load(scale_ptr + 2) + tl.load(base_ptr + res_col, mask=ij_ok, other=0.0)[None, :]
        valid = r_ok[:, None, None] & i_ok[None, :, None] & i_ok[None, None, :]
        comb = _sinkhorn_tile(tl.reshape(logits, [BN, NP, NP]), valid, iters, hc_eps)
        tl.store(post_ptr + r[:, None] * N_HC + i[None, :], post, mask=r_ok[:, None] & i_ok[None, :])
        offs = r[:, None, None] * N_HC * N_HC + i[None, :, None] * N_HC + i[None, None, :]
        tl.store(comb_ptr + offs, comb, mask=valid)


def _mix_partials(streams: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int]:
    """(partial mixes [splits, rows, BO], partial sums of squares [splits, rows], splits, BO, rows per program,
    splits per load of the finishing kernel) of streams [rows, n, d] against fn [outputs, n*d]."""
    rows, n, d = streams.shape
    width, outputs = n * d, fn.shape[0]
    bn, bk, split_cols = mix_plan(rows, width, outputs)
    splits, bo = triton.cdiv(width, split_cols), block(outputs, minimum=4)
    part = torch.empty(splits, rows, bo, dtype=torch.float32, device=streams.device)
    sq = torch.empty(splits, rows, dtype=torch.float32, device=streams.device)
    _mix_partial_kernel[(triton.cdiv(rows, bn), splits)](
        streams.contiguous(),
        fn.contiguous(),
        part,
        sq,
        rows,
        OUT=outputs,
        WIDTH=width,
        BO=bo,
        BN=bn,
        BK=bk,
        SPLIT=split_cols,
        num_warps=NUM_WARPS,
    )
    return part, sq, splits, bo, bn, _sum_chunk(bn, splits, bo)


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
    if not streams.shape[0]:
        return _pre_outputs(streams)
    part, sq, splits, bo, bn, sc = _mix_partials(streams, fn)
    s = streams.contiguous()
    return _finish_pre(part, sq, splits, bo, bn, sc, s, scale, base, sinkhorn_iters, hc_eps, norm_eps)


def _pre_outputs(streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (x, post, comb) of the pre-mapping of streams [rows, n, d]."""
    rows, n, d = streams.shape
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    post = torch.empty(rows, n, dtype=torch.float32, device=streams.device)
    comb = torch.empty(rows, n, n, dtype=torch.float32, device=streams.device)
    return x, post, comb


def _finish_pre(
    part: torch.Tensor,
    sq: torch.Tensor,
    splits: int,
    bo: int,
    bn: int,
    sc: int,
    streams: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, post, comb) of the pre-mapping of contiguous streams [rows > 0, n, d] from its mixing partials."""
    rows, n, d = streams.shape
    x, post, comb = _pre_outputs(streams)
    _mhc_pre_finish_kernel[(triton.cdiv(rows, bn), triton.cdiv(d, BLOCK_D))](
        part,
        sq,
        streams,
        scale.float().contiguous(),
        base.float().contiguous(),
        x,
        post,
        comb,
        rows,
        splits,
        sinkhorn_iters,
        hc_eps,
        norm_eps,
        N_HC=n,
        DIM=d,
        NP=_np(n),
        BO=bo,
        BN=bn,
        SC=sc,
        BD=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return x, post, comb


@triton.jit
def _hc_head_finish_kernel(
    part_ptr,
    sq_ptr,
    streams_ptr,
    scale_ptr,
    base_ptr,
    x_ptr,
    rows,
    splits,
    hc_eps,
    norm_eps,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    SC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    r_ok = r < rows
    i = tl.arange(0, NP)
    i_ok = i < N_HC
    acc, sq = _summed(part_ptr, sq_ptr, r, r_ok, i, i_ok, rows, splits, BO, SC)
    rstd = tl.rsqrt(sq / (N_HC * DIM) + norm_eps)[:, None]
    w = tl.sigmoid(acc * rstd * tl.load(scale_ptr) + tl.load(base_ptr + i, mask=i_ok, other=0.0)[None, :])
    w = tl.where(i_ok[None, :], w + hc_eps, 0.0)
    _collapse_block(streams_ptr, x_ptr, w, r, r_ok, tl.program_id(1) * BD + tl.arange(0, BD), N_HC, DIM, NP)


@register("hc_head", "cuda")
def hc_head(
    streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    check_device("hc_head", streams, fn, scale, base)
    rows, n, d = streams.shape
    x = torch.empty(rows, d, dtype=streams.dtype, device=streams.device)
    if rows:
        part, sq, splits, bo, bn, sc = _mix_partials(streams, fn)
        _hc_head_finish_kernel[(triton.cdiv(rows, bn), triton.cdiv(d, BLOCK_D))](
            part,
            sq,
            streams.contiguous(),
            scale.float().contiguous(),
            base.float().contiguous(),
            x,
            rows,
            splits,
            hc_eps,
            norm_eps,
            N_HC=n,
            DIM=d,
            NP=_np(n),
            BO=bo,
            BN=bn,
            SC=sc,
            BD=BLOCK_D,
            num_warps=NUM_WARPS,
        )
    return x


@triton.jit
def _post_inputs(y_ptr, streams_ptr, r, r_ok, j, j_ok, c, c_ok, N_HC: tl.constexpr, DIM: tl.constexpr):
    """y [rows, columns] and the streams [rows, j, columns] of one block of mhc_post's inputs, in fp32 (0 outside
    the masks)."""
    y = tl.load(y_ptr + r[:, None] * DIM + c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    xs = tl.load(
        streams_ptr + r[:, None, None] * N_HC * DIM + j[None, :, None] * DIM + c[None, None, :],
        mask=r_ok[:, None, None] & j_ok[None, :, None] & c_ok[None, None, :],
        other=0.0,
    )
    return y.to(tl.float32), xs.to(tl.float32)


@triton.jit
def _post_stream(y, xs, post_ptr, comb_ptr, r, r_ok, j, j_ok, k, N_HC: tl.constexpr):
    """New stream k over one block: post[r, k] * y + sum_j comb[r, j, k] * xs[r, j] (fp32 [rows, columns])."""
    comb_k = tl.load(
        comb_ptr + r[:, None] * N_HC * N_HC + j[None, :] * N_HC + k, mask=r_ok[:, None] & j_ok[None, :], other=0.0
    )  # comb[:, j, k]
    post_k = tl.load(post_ptr + r * N_HC + k, mask=r_ok, other=0.0)
    return post_k[:, None] * y + tl.sum(comb_k[:, :, None] * xs, axis=1)


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
    y, xs = _post_inputs(y_ptr, streams_ptr, r, r_ok, j, j_ok, d, d_ok, N_HC, DIM)
    for k in tl.static_range(N_HC):
        out = _post_stream(y, xs, post_ptr, comb_ptr, r, r_ok, j, j_ok, k, N_HC)
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


@triton.jit
def _mhc_post_mix_kernel(
    y_ptr,
    streams_ptr,
    post_ptr,
    comb_ptr,
    fn_ptr,
    out_ptr,
    part_ptr,
    sq_ptr,
    rows,
    N_HC: tl.constexpr,
    DIM: tl.constexpr,
    NP: tl.constexpr,
    OUT: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """The new streams over the hidden columns C = [split * SPLIT, (split + 1) * SPLIT) (as `_mhc_post_kernel`),
    and the next mixing GEMV's partials over the columns k * DIM + C of every stream k, from the new values as
    stored: part[split, r, o] = sum fn[o, k * DIM + c] * out[r, k, c], sq[split, r] = sum out[r, k, c]^2."""
    r = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    r_ok = r < rows
    j = tl.arange(0, NP)
    j_ok = j < N_HC
    o = tl.arange(0, BO)
    o_ok = o < OUT
    acc = tl.zeros([BN, BO], dtype=tl.float32)
    sq = tl.zeros([BN], dtype=tl.float32)
    for c0 in range(0, SPLIT, BK):
        c = split * SPLIT + c0 + tl.arange(0, BK)
        c_ok = c < DIM
        ok = r_ok[:, None] & c_ok[None, :]
        y, xs = _post_inputs(y_ptr, streams_ptr, r, r_ok, j, j_ok, c, c_ok, N_HC, DIM)
        for k in tl.static_range(N_HC):
            v = _post_stream(y, xs, post_ptr, comb_ptr, r, r_ok, j, j_ok, k, N_HC).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + r[:, None] * N_HC * DIM + k * DIM + c[None, :], v, mask=ok)
            v32 = v.to(tl.float32)  # zero outside `ok`: y and xs load as 0 there
            sq += tl.sum(v32 * v32, axis=1)
            f = tl.load(
                fn_ptr + o[:, None] * (N_HC * DIM) + k * DIM + c[None, :],
                mask=o_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(v32[:, None, :] * f[None, :, :], axis=2)
    base = split.to(tl.int64) * rows
    tl.store(part_ptr + (base + r[:, None]) * BO + o[None, :], acc, mask=r_ok[:, None])
    tl.store(sq_ptr + base + r, sq, mask=r_ok)


@register("mhc_post_pre", "cuda")
def mhc_post_pre(
    y: torch.Tensor,
    streams: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("mhc_post_pre", y, streams, post, comb, fn, scale, base)
    rows, n, d = streams.shape
    s = streams.contiguous()
    new = torch.empty_like(s)
    if not rows:
        return (new, *_pre_outputs(new))
    outputs = fn.shape[0]
    bn, bk, split = post_mix_plan(rows, d, n, outputs)
    splits, bo = triton.cdiv(d, split), block(outputs, minimum=4)
    part = torch.empty(splits, rows, bo, dtype=torch.float32, device=s.device)
    sq = torch.empty(splits, rows, dtype=torch.float32, device=s.device)
    _mhc_post_mix_kernel[(triton.cdiv(rows, bn), splits)](
        y.contiguous(),
        s,
        post.float().contiguous(),
        comb.float().contiguous(),
        fn.contiguous(),
        new,
        part,
        sq,
        rows,
        N_HC=n,
        DIM=d,
        NP=_np(n),
        OUT=outputs,
        BO=bo,
        BN=bn,
        BK=bk,
        SPLIT=split,
        num_warps=NUM_WARPS,
    )
    sc = _sum_chunk(bn, splits, bo)
    return (new, *_finish_pre(part, sq, splits, bo, bn, sc, new, scale, base, sinkhorn_iters, hc_eps, norm_eps))
