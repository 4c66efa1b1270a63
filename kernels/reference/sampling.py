"""Reference token sampling: temperature, top-k / top-p / min-p filtering and Gumbel-max draws, row by row."""

from __future__ import annotations

import torch

from dsv4.kernels.registry import register


@register("filter_logits", "reference")
def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    x = logits.double() / temperature.double()[:, None]
    vocab = x.shape[-1]
    # The sorts cost more than the rest of a decode step's sampling: skip each stage no row uses.
    if bool(((top_k > 0) & (top_k < vocab)).any()):
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if not bool(((top_p < 1.0) | (min_p > 0.0)).any()):
        return x
    probs = torch.softmax(x, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly ahead of each token
    # The smallest prefix whose mass reaches top_p is kept; rows with top_p = 1 keep everything.
    drop_sorted = (before >= top_p.double()[:, None]) & (top_p < 1.0)[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    drop |= probs < min_p.double()[:, None] * probs.max(-1, keepdim=True).values
    return x.masked_fill(drop, float("-inf"))


@register("sample_tokens", "reference")
def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    greedy = temperature <= 0
    if bool(greedy.all()):
        return torch.argmax(logits, dim=-1)
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    # argmax(filtered logits + Gumbel noise) is a draw from softmax(filtered logits); excluded tokens stay -inf.
    drawn = torch.argmax(filter_logits(logits, safe_t, top_k, top_p, min_p) + noise, dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), drawn)
