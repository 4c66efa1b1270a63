"""Reference MoE router (sqrtsoftplus with selection bias, or hash table) and grouped expert matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.reference._select import topk_lower_index_wins
from dsv4.kernels.registry import register


@register("route", "reference")
def route(
    logits: torch.Tensor,
    topk: int,
    route_scale: float,
    bias: torch.Tensor | None,
    hash_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    A = accumulation_dtype(logits)
    if (bias is None) == (hash_idx is None):
        raise ValueError("route: pass exactly one of bias (learned routing) and hash_idx (hash routing)")
    scores = F.softplus(logits.to(A)).sqrt()
    if hash_idx is not None:
        idx = hash_idx.long()
    else:
        assert bias is not None
        idx = topk_lower_index_wins(scores + bias.to(A), topk)
    weights = scores.gather(1, idx)
    return weights / weights.sum(dim=-1, keepdim=True) * route_scale, idx


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def zero_rows_past_end(out: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    """out [M, O] with the rows from group_ends[-1] on (rows of no expert) set to 0, without reading group_ends on
    the host."""
    rows = torch.arange(out.shape[0], device=out.device)
    return torch.where((rows < group_ends[-1])[:, None], out, out.new_zeros(()))


@register("grouped_matmul", "reference")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    weight = weight.to(x.dtype)  # a weight kept in its stored dtype (bf16 experts under fp32 compute)
    if x.dtype in _GROUPED_MM_DTYPES:
        # (rows past the last offset come back uninitialized)
        out = torch._grouped_mm(x, weight.transpose(1, 2), offs=group_ends.to(torch.int32))
    else:
        # Other dtypes (float64 in precision tests): gather each row's expert weight; memory M*O*K, fine at test
        # sizes.
        rows = torch.arange(x.shape[0], device=x.device)
        expert = torch.searchsorted(group_ends.to(torch.int64), rows, right=True).clamp(max=weight.shape[0] - 1)
        out = torch.bmm(weight[expert], x.unsqueeze(-1)).squeeze(-1)
    return zero_rows_past_end(out, group_ends)
