"""Top-k with a fixed tie rule, shared by the reference ops that select (indexer, router)."""

from __future__ import annotations

import torch


def topk_lower_index_wins(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest values along the last dim; among equal values the lower index is taken.

    `torch.topk` leaves ties to the implementation, and it breaks them differently for a prefill's [S, E] rows
    than for a decode's [1, E] row, so a recomputed prefix could select other entries than the original decode
    did (bf16 indexer scores tie often). The order of the returned indices is unspecified.
    """
    n = score.shape[-1]
    if k == 0 or n == 0:
        return torch.empty(*score.shape[:-1], 0, dtype=torch.int64, device=score.device)
    kth = score.topk(k, dim=-1).values[..., -1:]
    greater = score > kth
    tie = score == kth
    room = k - greater.sum(dim=-1, keepdim=True)
    take = greater | (tie & (tie.cumsum(dim=-1) <= room))
    # exactly k entries are taken; rank them by a distinct positive key so topk returns precisely those
    key = torch.where(take, n - torch.arange(n, device=score.device), 0)
    return key.topk(k, dim=-1).indices
