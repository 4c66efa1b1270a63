"""Triton compressor pooling, lightning-indexer scores + top-k, and sparse shared-K=V attention with sink.

Sparse attention is a decode-shaped flash kernel: one program per (query token, block of 16 heads) walks the
token's index list in blocks of 16, gathers K=V rows by index and keeps an online softmax; the sink enters the
denominator at the end. Top-k is a radix select on the order-preserving integer image of the fp32 scores:
32 counting passes find the k-th largest key, then one pass emits the strictly larger entries and one the ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import MIN_DOT, block, check_device, dot_precision
from dsv4.kernels.registry import register

# a [16 heads, 512] fp32 accumulator: 159 registers a thread at 4 warps, 102 at 8 (ptxas for sm_90)
ATTENTION_WARPS = 8


@triton.jit
def _pool_tile(kv, score):
    """[BLOCK_L, BLOCK_C] slots of a block -> [BLOCK_C]: the softmax over the slots of score weights kv (masked
    slots: score -inf, kv 0; a channel with none gives 0)."""
    m = tl.max(score, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(score - m[None, :])
    total = tl.sum(p, axis=0)
    return tl.sum(p * kv, axis=0) / tl.where(total == 0.0, 1.0, total)


def _pool_block_c(slots: int, channels: int) -> int:
    # at most 4,096 elements a tile: [128, 128] fp32 kv and score tiles (an HCA block of m = 128) take 167
    # registers a thread at 4 warps (ptxas for sm_90), [128, 32] tiles 79, so more programs fit an SM
    return block(channels, maximum=max(16, 4096 // block(slots)))


@triton.jit
def _compress_pool_kernel(
    kv_ptr, score_ptr, out_ptr, L: tl.constexpr, C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = tl.arange(0, BLOCK_L)
    ok = (slot[:, None] < L) & (c[None, :] < C)
    offs = row * L * C + slot[:, None] * C + c[None, :]
    score = tl.load(score_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
    kv = tl.load(kv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + c, _pool_tile(kv, score), mask=c < C)


@register("compress_pool", "cuda")
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    check_device("compress_pool", kv, score)
    *lead, slots, channels = kv.shape
    out = torch.empty(*lead, channels, dtype=torch.float32, device=kv.device)
    rows = out.numel() // channels if channels else 0
    if rows:
        blk = _pool_block_c(slots, channels)
        _compress_pool_kernel[(rows, triton.cdiv(channels, blk))](
            kv.float().contiguous(),
            score.float().contiguous(),
            out,
            L=slots,
            C=channels,
            BLOCK_L=block(slots),
            BLOCK_C=blk,
        )
    return out


@triton.jit
def _compress_pool_slots_kernel(
    kv_ptr,
    score_ptr,
    slots_ptr,
    complete_ptr,
    out_ptr,
    L: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    PREV: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # a row whose token completes no block loads nothing (its masked loads touch no memory) and stores zeros
    filled = tl.where(tl.load(complete_ptr + row) != 0, L, 0)
    state = tl.load(slots_ptr + row).to(tl.int64)
    slot = tl.arange(0, BLOCK_L)
    # CSA (PREV = m): slots [m, 2m) hold the current block, whose half is the last C of the W = 2C channels
    channel = tl.where(slot[:, None] >= PREV, c[None, :] + (W - C), c[None, :])
    ok = (slot[:, None] < filled) & (c[None, :] < C)
    offs = state * (L * W) + slot[:, None] * W + channel
    score = tl.load(score_ptr + offs, mask=ok, other=float("-inf"))
    kv = tl.load(kv_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * C + c, _pool_tile(kv, score), mask=c < C)


@register("compress_pool_slots", "cuda")
def compress_pool_slots(
    state_kv: torch.Tensor, state_score: torch.Tensor, slots: torch.Tensor, complete: torch.Tensor, overlap: bool
) -> torch.Tensor:
    check_device("compress_pool_slots", state_kv, state_score, slots, complete)
    for t in (state_kv, state_score):
        if t.dtype != torch.float32 or not t.is_contiguous():
            # a copy here would be the whole pool's state, every step
            raise ValueError(f"compress_pool_slots: the states must be contiguous fp32, got {t.dtype}")
    _, length, width = state_kv.shape
    channels = width // 2 if overlap else width
    out = torch.empty(slots.shape[0], channels, dtype=torch.float32, device=state_kv.device)
    if out.numel():
        blk = _pool_block_c(length, channels)
        _compress_pool_slots_kernel[(out.shape[0], triton.cdiv(channels, blk))](
            state_kv,
            state_score,
            slots.contiguous(),
            complete.contiguous().view(torch.uint8),
            out,
            L=length,
            W=width,
            C=channels,
            PREV=length // 2 if overlap else 0,
            BLOCK_L=block(length),
            BLOCK_C=blk,
        )
    return out


@triton.jit
def _indexer_scores_kernel(
    q_ptr,
    w_ptr,
    keys_ptr,
    visible_ptr,
    out_ptr,
    S,
    E,
    HI: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * S + s; int64: row * E passes 2^31 at long context
    b = row // S
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < HI
    d_ok = d < D
    q = tl.load(q_ptr + (row * HI + h[:, None]) * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(keys_ptr + (b * E + e[:, None]) * D + d[None, :], mask=(e[:, None] < E) & d_ok[None, :], other=0.0)
    logits = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # [H, E]
    w = tl.load(w_ptr + row * HI + h, mask=h_ok, other=0.0).to(tl.float32)
    if ROUND_BF16:  # the contract's official bf16 scoring: weights, dot, weighting and head sum rounded to bf16
        w = w.to(tl.bfloat16).to(tl.float32)
        logits = logits.to(tl.bfloat16).to(tl.float32)
        part = (tl.maximum(logits, 0.0) * w[:, None]).to(tl.bfloat16).to(tl.float32)
        score = tl.sum(part, axis=0).to(tl.bfloat16).to(tl.float32)
    else:
        score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
    visible = tl.load(visible_ptr + row)
    score = tl.where(e < visible, score, float("-inf"))
    tl.store(out_ptr + row * E + e, score, mask=e < E)


@triton.jit
def _sort_key(x):
    """fp32 -> int64 in [0, 2^32) with the same order (negative floats: bits flipped; positive: top bit set)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in the reference's comparisons
    bits = x.to(tl.int32, bitcast=True)
    unsigned = bits.to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits < 0, 0xFFFFFFFF - unsigned, unsigned + 0x80000000)


@triton.jit
def _topk_kernel(score_ptr, visible_ptr, out_ptr, rows, E, K, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    one = tl.full([BLOCK_R], 1, tl.int64)
    kth = tl.zeros([BLOCK_R], dtype=tl.int64)
    for bit in range(31, -1, -1):  # greedy: the largest key with at least K entries >= it is the k-th largest
        cand = kth | (one << bit)
        count = tl.zeros([BLOCK_R], dtype=tl.int64)
        for e0 in range(0, E, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            ok = r_ok[:, None] & (e[None, :] < E)
            key = _sort_key(tl.load(score_ptr + r[:, None] * E + e[None, :], mask=ok, other=0.0))
            count += tl.sum(((key >= cand[:, None]) & ok).to(tl.int64), axis=1)
        kth = tl.where(count >= K, cand, kth)
    visible = tl.load(visible_ptr + r, mask=r_ok, other=0)[:, None]
    n_greater = tl.zeros([BLOCK_R], dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = r_ok[:, None] & (e[None, :] < E)
        key = _sort_key(tl.load(score_ptr + r[:, None] * E + e[None, :], mask=ok, other=0.0))
        take = (key > kth[:, None]) & ok
        pos = n_greater[:, None] + tl.cumsum(take.to(tl.int64), axis=1) - 1
        pick = tl.where(e[None, :] < visible, e[None, :], -1).to(tl.int64)
        tl.store(out_ptr + r[:, None] * K + pos, pick, mask=take)
        n_greater += tl.sum(take.to(tl.int64), axis=1)
    n_ties = tl.zeros([BLOCK_R], dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        ok = r_ok[:, None] & (e[None, :] < E)
        key = _sort_key(tl.load(score_ptr + r[:, None] * E + e[None, :], mask=ok, other=0.0))
        tie = (key == kth[:, None]) & ok
        pos = (n_greater + n_ties)[:, None] + tl.cumsum(tie.to(tl.int64), axis=1) - 1
        pick = tl.where(e[None, :] < visible, e[None, :], -1).to(tl.int64)
        tl.store(out_ptr + r[:, None] * K + pos, pick, mask=tie & (pos < K))
        n_ties += tl.sum(tie.to(tl.int64), axis=1)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[B, S, E] fp32 index scores (-inf where not visible); the first half of `indexer_topk`."""
    b, s, hi, d = q.shape
    e = keys.shape[1]
    out = torch.empty(b, s, e, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    blk_e = block(e, minimum=MIN_DOT, maximum=64)
    _indexer_scores_kernel[(b * s, triton.cdiv(e, blk_e))](
        q.contiguous(),
        weights.contiguous(),
        keys.contiguous(),
        visible.to(torch.int64).contiguous(),
        out,
        s,
        e,
        HI=hi,
        D=d,
        BLOCK_H=block(hi, minimum=MIN_DOT),
        BLOCK_D=block(d, minimum=MIN_DOT),
        BLOCK_E=blk_e,
        ROUND_BF16=q.dtype == torch.bfloat16,
        PRECISION=dot_precision(q.dtype),
    )
    return out


def topk_select(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., E] fp32 -> [..., k] int64 indices of the k largest (-1 where index >= visible)."""
    e = scores.shape[-1]
    lead = scores.shape[:-1]
    out = torch.empty(*lead, k, dtype=torch.int64, device=scores.device)
    rows = scores.numel() // e if e else 0
    if rows and k:
        block_e = block(e, maximum=1024)
        block_r = block(rows, maximum=max(1, 2048 // block_e))
        _topk_kernel[(triton.cdiv(rows, block_r),)](
            scores.contiguous(),
            visible.to(torch.int64).contiguous(),
            out,
            rows,
            e,
            k,
            BLOCK_R=block_r,
            BLOCK_E=block_e,
        )
    return out


@register("indexer_topk", "cuda")
def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int
) -> torch.Tensor:
    check_device("indexer_topk", q, weights, keys, visible)
    k = min(topk, keys.shape[1])
    return topk_select(indexer_scores(q, weights, keys, visible), visible, k)


@triton.jit
def _sparse_attention_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    sink_ptr,
    out_ptr,
    S,
    N,
    K,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * S + s; int64: row * H * D passes 2^31 in long prefills
    b = row // S
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < H
    d_ok = d < D
    q = tl.load(q_ptr + (row * H + h[:, None]) * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slot = k0 + tl.arange(0, BLOCK_K)
        entry = tl.load(idx_ptr + row * K + slot, mask=slot < K, other=-1)
        valid = entry >= 0
        kv = tl.load(
            kv_ptr + (b * N + entry[:, None]) * D + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0
        )  # [BLOCK_K, D]
        s = tl.dot(q, tl.trans(kv.to(q.dtype)), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
        m = m_new
    sink = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    top = tl.maximum(m, sink)
    alpha = tl.exp(m - top)
    denom = total * alpha + tl.exp(sink - top)
    out = acc * (alpha / denom)[:, None]
    tl.store(
        out_ptr + (row * H + h[:, None]) * D + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=h_ok[:, None] & d_ok[None, :],
    )


@register("sparse_attention", "cuda")
def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    check_device("sparse_attention", q, kv, idx, sink)
    b, s, h, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    k = idx.shape[-1]
    if k == 0:
        return out.zero_()
    blk_h = MIN_DOT
    _sparse_attention_kernel[(b * s, triton.cdiv(h, blk_h))](
        q.contiguous(),
        kv.contiguous(),
        idx.to(torch.int64).contiguous(),
        sink.float().contiguous(),
        out,
        s,
        kv.shape[1],
        k,
        scale,
        H=h,
        D=d,
        BLOCK_H=blk_h,
        BLOCK_D=block(d, minimum=MIN_DOT),
        BLOCK_K=MIN_DOT,
        PRECISION=dot_precision(q.dtype),
        num_warps=ATTENTION_WARPS,
    )
    return out
