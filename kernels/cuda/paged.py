"""Paged decode ops on the `cuda` backend: Triton kernels that read the KV pool in place through block tables.

Attention: one program per (row, 16 heads) walks the row's W window positions (ring rows of its slot), then its
selected entries, each entry's row found through the block table and decoded in registers (e4m3 bits times a
UE8M0 scale per 64 dims, RoPE dims in the model dtype), with the online softmax of `attention.py`'s kernel.

Indexer: a scoring kernel decodes each key (MXFP4 nibbles times UE8M0 scales) where it lies and writes the row's
scores, padded to whole chunks; top-k is split-k: every chunk of a row is selected on its own by the radix-select
kernel of `attention.py` (so a batch of one at a long context still fills the GPU with chunk programs), then
groups of chunk winners are merged by `_merge_topk_kernel` until one group is left. The merge orders candidates
by (score, lower entry index first), so the result is exactly the contract's, ties included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.attention import ATTENTION_WARPS, _sort_key, _topk_kernel
from dsv4.kernels.cuda.launch import MIN_DOT, block, check_device, dot_precision
from dsv4.kernels.cuda.mx import e2m1, e4m3, e8m0
from dsv4.kernels.paged import FP8_NOPE, MXFP4, PLAIN, PagedRows
from dsv4.kernels.registry import register

_FORMAT_CODE = {PLAIN: 0, FP8_NOPE: 1, MXFP4: 2}
TOPK_CHUNK = 2048  # entries per split-k program row: 1M tokens of context (262,144 entries) -> 128 chunks
MERGE_GROUP = 8  # chunk winners merged per program and level


@triton.jit
def _load_row(t0_ptr, t1_ptr, t2_ptr, flat, d, ok, D: tl.constexpr, NOPE: tl.constexpr, FORMAT: tl.constexpr):
    """Decoded rows [len(flat), len(d)] fp32 at flat rows `flat` (int64) of a store in FORMAT (0 plain,
    1 FP8 nope + rope, 2 MXFP4); `ok` masks (row, dim) pairs."""
    if FORMAT == 0:
        return tl.load(t0_ptr + flat[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    elif FORMAT == 1:
        is_nope = d[None, :] < NOPE
        q = tl.load(t0_ptr + flat[:, None] * NOPE + d[None, :], mask=ok & is_nope, other=0)
        s = tl.load(t1_ptr + flat[:, None] * (NOPE // 64) + d[None, :] // 64, mask=ok & is_nope, other=127)
        rope = tl.load(t2_ptr + flat[:, None] * (D - NOPE) + (d[None, :] - NOPE), mask=ok & ~is_nope, other=0.0)
        return tl.where(is_nope, e4m3(q) * e8m0(s), rope.to(tl.float32))
    else:
        packed = tl.load(t0_ptr + flat[:, None] * (D // 2) + d[None, :] // 2, mask=ok, other=0)
        code = (packed.to(tl.int32) >> ((d[None, :] % 2) * 4)) & 0xF
        s = tl.load(t1_ptr + flat[:, None] * (D // 32) + d[None, :] // 32, mask=ok, other=127)
        return e2m1(code) * e8m0(s)


def _fields(rows: PagedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The store's tensors as the kernels take them (unused pointers repeat the first)."""
    ts = [t.contiguous() for t in rows.tensors]
    return ts[0], ts[1] if len(ts) > 1 else ts[0], ts[2] if len(ts) > 2 else ts[0]


def _nope(rows: PagedRows) -> int:
    return rows.tensors[0].shape[-1] if rows.format == FP8_NOPE else rows.dim


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    win_ptr,
    slot_ptr,
    pos_ptr,
    e0_ptr,
    e1_ptr,
    e2_ptr,
    table_ptr,
    idx_ptr,
    sink_ptr,
    out_ptr,
    T,
    K,
    scale,
    H: tl.constexpr,
    D: tl.constexpr,
    W: tl.constexpr,
    NOPE: tl.constexpr,
    RPB: tl.constexpr,
    FORMAT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < H
    d_ok = d < D
    q = tl.load(q_ptr + (b * H + h[:, None]) * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    t = tl.load(pos_ptr + b).to(tl.int64)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    n_keys = W + K
    for k0 in range(0, n_keys, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        in_window = j < W
        p = t - (W - 1) + j  # window positions, oldest first
        valid_w = in_window & (p >= 0)
        ring = (p % W + W) % W
        win = tl.load(
            win_ptr + (slot * W + ring[:, None]) * D + d[None, :], mask=valid_w[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        slot_k = tl.where(in_window, 0, j - W)
        entry = tl.load(idx_ptr + b * K + slot_k, mask=(~in_window) & (j < n_keys), other=-1).to(tl.int64)
        valid_e = (~in_window) & (entry >= 0)
        e_safe = tl.where(valid_e, entry, 0)
        blk = tl.load(table_ptr + b * T + e_safe // RPB, mask=valid_e, other=0).to(tl.int64)
        flat = blk * RPB + e_safe % RPB
        ent = _load_row(e0_ptr, e1_ptr, e2_ptr, flat, d, valid_e[:, None] & d_ok[None, :], D, NOPE, FORMAT)
        kv = tl.where(in_window[:, None], win, ent).to(q.dtype)
        valid = valid_w | valid_e
        s = tl.dot(q, tl.trans(kv), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        prob = tl.exp(s - m_safe[:, None])
        total = total * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(kv.dtype), kv, input_precision=PRECISION)
        m = m_new
    sink = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
    top = tl.maximum(m, sink)
    alpha = tl.exp(m - top)
    denom = total * alpha + tl.exp(sink - top)
    out = acc * (alpha / denom)[:, None]
    tl.store(
        out_ptr + (b * H + h[:, None]) * D + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=h_ok[:, None] & d_ok[None, :],
    )


@register("paged_sparse_attention", "cuda")
def paged_sparse_attention(
    q: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entries: PagedRows | None,
    block_tables: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    check_device("paged_sparse_attention", q, window, slots, positions, block_tables, entry_idx, sink)
    b, h, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    use_entries = entries is not None and entry_idx is not None and entry_idx.shape[-1] > 0
    if use_entries:
        assert entries is not None and entry_idx is not None
        check_device("paged_sparse_attention", *entries.tensors)
        e0, e1, e2 = _fields(entries)
        idx, k = entry_idx.to(torch.int64).contiguous(), entry_idx.shape[-1]
        fmt, nope, rpb = _FORMAT_CODE[entries.format], _nope(entries), entries.rows_per_block
    else:
        e0 = e1 = e2 = window
        idx, k, fmt, nope, rpb = slots, 0, 0, d, 1
    blk_h = MIN_DOT
    _paged_attention_kernel[(b, triton.cdiv(h, blk_h))](
        q.contiguous(),
        window.contiguous(),
        slots.to(torch.int64).contiguous(),
        positions.to(torch.int64).contiguous(),
        e0,
        e1,
        e2,
        block_tables.contiguous(),
        idx,
        sink.float().contiguous(),
        out,
        block_tables.shape[1],
        k,
        scale,
        H=h,
        D=d,
        W=window.shape[1],
        NOPE=nope,
        RPB=rpb,
        FORMAT=fmt,
        BLOCK_H=blk_h,
        BLOCK_D=block(d, minimum=MIN_DOT),
        BLOCK_K=MIN_DOT,
        PRECISION=dot_precision(q.dtype),
        num_warps=ATTENTION_WARPS,
    )
    return out


@triton.jit
def _paged_scores_kernel(
    q_ptr,
    w_ptr,
    k0_ptr,
    k1_ptr,
    k2_ptr,
    table_ptr,
    visible_ptr,
    out_ptr,
    T,
    E_PAD,
    HI: tl.constexpr,
    D: tl.constexpr,
    RPB: tl.constexpr,
    FORMAT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < HI
    d_ok = d < D
    e_ok = e < T * RPB
    q = tl.load(q_ptr + (b * HI + h[:, None]) * D + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    blk = tl.load(table_ptr + b * T + e // RPB, mask=e_ok, other=0).to(tl.int64)
    k = _load_row(k0_ptr, k1_ptr, k2_ptr, blk * RPB + e % RPB, d, e_ok[:, None] & d_ok[None, :], D, D, FORMAT)
    logits = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # [H, E]
    w = tl.load(w_ptr + b * HI + h, mask=h_ok, other=0.0).to(tl.float32)
    if ROUND_BF16:  # as attention.py's scores kernel: the official bf16 scoring
        w = w.to(tl.bfloat16).to(tl.float32)
        logits = logits.to(tl.bfloat16).to(tl.float32)
        part = (tl.maximum(logits, 0.0) * w[:, None]).to(tl.bfloat16).to(tl.float32)
        score = tl.sum(part, axis=0).to(tl.bfloat16).to(tl.float32)
    else:
        score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
    visible = tl.load(visible_ptr + b)
    score = tl.where(e < visible, score, float("-inf"))
    tl.store(out_ptr + b * E_PAD + e, score, mask=e < E_PAD)


@triton.jit
def _merge_topk_kernel(
    score_ptr, cand_ptr, visible_ptr, out_ptr, N, K, E_PAD, GROUPS, BLOCK: tl.constexpr, BITS: tl.constexpr
):
    """One group of candidates (entry indices into its row's scores, -1 = none) -> its K best, ordered by score
    then lower index; picks at or past the row's visible count become -1, missing picks stay -1."""
    g = tl.program_id(0).to(tl.int64)
    b = g // GROUPS
    visible = tl.load(visible_ptr + b)
    one = tl.full([1], 1, tl.int64)
    kth = tl.zeros([1], dtype=tl.int64)
    for bit in range(31, -1, -1):  # the k-th largest score key among the valid candidates
        cand_key = kth | (one << bit)
        count = tl.zeros([1], dtype=tl.int64)
        for j0 in range(0, N, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            idx = tl.load(cand_ptr + g * N + j, mask=j < N, other=-1)
            valid = idx >= 0
            key = _sort_key(tl.load(score_ptr + b * E_PAD + idx, mask=valid, other=0.0))
            count += tl.sum(((key >= cand_key) & valid).to(tl.int64), axis=0)
        kth = tl.where(count >= K, cand_key, kth)
    n_greater = tl.zeros([1], dtype=tl.int64)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        idx = tl.load(cand_ptr + g * N + j, mask=j < N, other=-1)
        valid = idx >= 0
        key = _sort_key(tl.load(score_ptr + b * E_PAD + idx, mask=valid, other=0.0))
        n_greater += tl.sum(((key > kth) & valid).to(tl.int64), axis=0)
    room = K - n_greater
    # the ties to take are the `room` lowest entry indices: the largest (2^BITS - 1 - index) bound with that many
    top = tl.zeros([1], dtype=tl.int64)
    for bit in range(BITS - 1, -1, -1):
        cand_key = top | (one << bit)
        count = tl.zeros([1], dtype=tl.int64)
        for j0 in range(0, N, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            idx = tl.load(cand_ptr + g * N + j, mask=j < N, other=-1)
            valid = idx >= 0
            key = _sort_key(tl.load(score_ptr + b * E_PAD + idx, mask=valid, other=0.0))
            low = (1 << BITS) - 1 - idx
            count += tl.sum(((key == kth) & valid & (low >= cand_key)).to(tl.int64), axis=0)
        top = tl.where(count >= room, cand_key, top)
    written = tl.zeros([1], dtype=tl.int64)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        idx = tl.load(cand_ptr + g * N + j, mask=j < N, other=-1)
        valid = idx >= 0
        key = _sort_key(tl.load(score_ptr + b * E_PAD + idx, mask=valid, other=0.0))
        low = (1 << BITS) - 1 - idx
        take = valid & ((key > kth) | ((key == kth) & (low >= top) & (room > 0)))
        pos = written + tl.cumsum(take.to(tl.int64), axis=0) - 1
        pick = tl.where(idx < visible, idx, -1)
        tl.store(out_ptr + g * K + pos, pick, mask=take & (pos < K))
        written += tl.sum(take.to(tl.int64), axis=0)


def split_topk(scores: torch.Tensor, visible: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """scores [B, E_PAD] fp32 (E_PAD a multiple of `chunk` >= k) -> [B, k] int64, the k best entries of each row
    (ties to the lower index), -1 where the pick is at or past visible[b] or missing."""
    b, e_pad = scores.shape
    n_chunks = e_pad // chunk
    device = scores.device
    # split: the radix-select kernel over every chunk as a row of its own; its indices are local to the chunk
    local_visible = (visible[:, None] - torch.arange(n_chunks, device=device) * chunk).clamp(0, chunk)
    rows = b * n_chunks
    local = torch.empty(rows, k, dtype=torch.int64, device=device)
    block_e = block(chunk, maximum=1024)
    block_r = block(rows, maximum=max(1, 2048 // block_e))
    _topk_kernel[(triton.cdiv(rows, block_r),)](
        scores, local_visible.reshape(-1).contiguous(), local, rows, chunk, k, BLOCK_R=block_r, BLOCK_E=block_e
    )
    offsets = (torch.arange(n_chunks, device=device) * chunk).repeat(b)[:, None]
    cand = torch.where(local >= 0, local + offsets, -1).view(b, n_chunks * k)
    bits = max(1, (e_pad - 1).bit_length())
    # merge: groups of chunk winners -> their k best, until one group per row remains
    while cand.shape[1] > k:
        groups = triton.cdiv(cand.shape[1] // k, MERGE_GROUP)
        width = MERGE_GROUP * k
        if cand.shape[1] < groups * width:
            cand = torch.nn.functional.pad(cand, (0, groups * width - cand.shape[1]), value=-1)
        out = torch.full((b * groups, k), -1, dtype=torch.int64, device=device)
        _merge_topk_kernel[(b * groups,)](
            scores,
            cand.reshape(b * groups, width).contiguous(),
            visible.contiguous(),
            out,
            width,
            k,
            e_pad,
            groups,
            BLOCK=block(width, maximum=1024),
            BITS=bits,
        )
        cand = out.view(b, groups * k)
    return torch.where(cand < visible[:, None], cand, -1)


@register("paged_indexer_topk", "cuda")
def paged_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: PagedRows,
    block_tables: torch.Tensor,
    visible: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    check_device("paged_indexer_topk", q, weights, block_tables, visible, *keys.tensors)
    b, hi, d = q.shape
    n_entries = block_tables.shape[1] * keys.rows_per_block
    k = min(topk, n_entries)
    if b == 0 or k == 0:
        return torch.full((b, k), -1, dtype=torch.int64, device=q.device)
    chunk = max(block(k), min(TOPK_CHUNK, block(n_entries)))
    e_pad = triton.cdiv(n_entries, chunk) * chunk
    scores = torch.empty(b, e_pad, dtype=torch.float32, device=q.device)
    blk_e = 64
    k0, k1, k2 = _fields(keys)
    vis = visible.to(torch.int64).contiguous()
    _paged_scores_kernel[(b, triton.cdiv(e_pad, blk_e))](
        q.contiguous(),
        weights.contiguous(),
        k0,
        k1,
        k2,
        block_tables.contiguous(),
        vis,
        scores,
        block_tables.shape[1],
        e_pad,
        HI=hi,
        D=d,
        RPB=keys.rows_per_block,
        FORMAT=_FORMAT_CODE[keys.format],
        BLOCK_H=block(hi, minimum=MIN_DOT),
        BLOCK_D=block(d, minimum=MIN_DOT),
        BLOCK_E=blk_e,
        ROUND_BF16=q.dtype == torch.bfloat16,
        PRECISION=dot_precision(q.dtype),
    )
    return split_topk(scores, vis, k, chunk)
