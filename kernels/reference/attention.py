"""Reference compressor pooling, lightning-indexer top-k and sparse shared-K=V attention with sink."""

from __future__ import annotations

import torch

from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.reference._select import topk_lower_index_wins
from dsv4.kernels.registry import register


@register("compress_pool", "reference")
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    return (kv * score.softmax(dim=-2, dtype=accumulation_dtype(score))).sum(dim=-2)


@register("compress_pool_slots", "reference")
def compress_pool_slots(
    state_kv: torch.Tensor, state_score: torch.Tensor, slots: torch.Tensor, complete: torch.Tensor, overlap: bool
) -> torch.Tensor:
    kv, score = state_kv[slots], state_score[slots]  # every row's state: the reference reads them all
    if overlap:
        m, c = kv.shape[1] // 2, kv.shape[2] // 2
        kv = torch.cat([kv[:, :m, :c], kv[:, m:, c:]], dim=1)
        score = torch.cat([score[:, :m, :c], score[:, m:, c:]], dim=1)
    return torch.where(complete[:, None], compress_pool(kv, score), 0.0)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """score [B, S, E] = sum_h weights[..., h] * ReLU(q[..., h, :] . keys[e]), rounded like the official kernels.

    Products of bf16 (or fp32) inputs are exact in the accumulation dtype; the score is rounded to q.dtype once
    after the dot product, once after the weighting and once after the head sum (fp32 accumulation inside each
    op, as PyTorch's bf16 einsum / mul / sum do). Returned in the accumulation dtype.
    """
    A = accumulation_dtype(q)
    scores = torch.einsum("bshd,bed->bshe", q.to(A), keys.to(q.dtype).to(A)).to(q.dtype).relu_()  # [B, S, Hi, E]
    weighted = (scores.to(A) * weights.to(q.dtype).to(A).unsqueeze(-1)).to(q.dtype)
    return weighted.to(A).sum(dim=2).to(q.dtype).to(A)


@register("indexer_topk", "reference")
def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int
) -> torch.Tensor:
    n_entries = keys.shape[1]
    k = min(topk, n_entries)
    score = indexer_scores(q, weights, keys)
    entry = torch.arange(n_entries, device=q.device)
    masked = entry.view(1, 1, -1) >= visible.unsqueeze(-1)
    score = score.masked_fill(masked, float("-inf"))
    idx = topk_lower_index_wins(score, k)
    return torch.where(idx >= visible.unsqueeze(-1), torch.full_like(idx, -1), idx)


@register("sparse_attention", "reference")
def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    A = accumulation_dtype(q)
    b, s, k = idx.shape
    n = kv.shape[1]
    valid = idx >= 0
    if n <= 2 * k:
        # Few candidate entries (prefill, short contexts): score all of them and mask; no [B, S, K, D] gather.
        keys = kv.to(A)
        selected = torch.zeros(b, s, n + 1, dtype=torch.bool, device=q.device)
        selected.scatter_(-1, torch.where(valid, idx, n), True)
        scores = torch.einsum("bshd,bnd->bshn", q.to(A), keys) * scale
        scores = scores.masked_fill(~selected[..., :n].unsqueeze(2), float("-inf"))
        return softmax_with_sink(scores, sink.to(A), keys, "bshn,bnd->bshd").to(q.dtype)
    gathered = torch.gather(kv.to(A), 1, idx.clamp(min=0).reshape(b, s * k, 1).expand(-1, -1, kv.shape[-1])).view(
        b, s, k, -1
    )  # [B, S, K, D]
    scores = torch.einsum("bshd,bskd->bshk", q.to(A), gathered) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    return softmax_with_sink(scores, sink.to(A), gathered, "bshk,bskd->bshd").to(q.dtype)


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor, values: torch.Tensor, equation: str) -> torch.Tensor:
    """Softmax over the last axis of scores [B, S, H, K] with a per-head sink logit in the denominator only."""
    b, s = scores.shape[:2]
    logits = torch.cat([scores, sink.view(1, 1, -1, 1).expand(b, s, -1, 1)], dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = logits.softmax(dim=-1)[..., :-1]
    return torch.einsum(equation, probs, values)
