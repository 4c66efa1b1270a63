"""Reference token sampling: temperature, top-k / top-p / min-p filtering and Gumbel-max draws, all rows at once.

No value is read on the host: a filter no row uses is passed as None by the caller, which knows it from the
requests' parameters (on a GPU, inspecting the tensors to skip the sorts would stall every step).
"""

from __future__ import annotations

import torch

from dsv4.kernels.registry import register


@register("filter_logits", "reference")
def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    x = logits.double() / temperature.double()[:, None]
    vocab = x.shape[-1]
    if top_k is not None:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is None and min_p is None:
        return x
    probs = torch.softmax(x, dim=-1)
    drop = torch.zeros_like(x, dtype=torch.bool)
    if top_p is not None:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly ahead of each token
        # The smallest prefix whose mass reaches top_p is kept; rows with top_p = 1 keep everything.
        drop_sorted = (before >= top_p.double()[:, None]) & (top_p < 1.0)[:, None]
        drop = drop.scatter(-1, order, drop_sorted)
    if min_p is not None:
        drop |= probs < min_p.double()[:, None] * probs.max(-1, keepdim=True).values
    return x.masked_fill(drop, float("-inf"))


@register("sample_tokens", "reference")
def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    best = torch.argmax(logits, dim=-1)
    if noise is None:
        return best
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    # argmax(filtered logits + Gumbel noise) is a draw from softmax(filtered logits); excluded tokens stay -inf.
    drawn = torch.argmax(filter_logits(logits, safe_t, top_k, top_p, min_p) + noise, dim=-1)
    return torch.where(greedy, best, drawn)
