"""Reference MoE router (sqrtsoftplus with selection bias, or hash table) and grouped expert matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.kernels.registry import register


@register("route", "reference")
def route(
    logits: torch.Tensor,
    topk: int,
    route_scale: float,
    bias: torch.Tensor | None,
    hash_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if (bias is None) == (hash_idx is None):
        raise ValueError("route: pass exactly one of bias (learned routing) and hash_idx (hash routing)")
    scores = F.softplus(logits.float()).sqrt()
    if hash_idx is not None:
        idx = hash_idx.long()
    else:
        assert bias is not None
        idx = torch.topk(scores + bias.float(), topk, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    return weights / weights.sum(dim=-1, keepdim=True) * route_scale, idx


@register("grouped_matmul", "reference")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=group_ends.to(torch.int32))
