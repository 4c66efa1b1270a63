"""Reference fused ops: the compositions a device backend may implement as one kernel."""

from __future__ import annotations

import torch

from dsv4.kernels.reference.mhc import mhc_post, mhc_pre
from dsv4.kernels.reference.norm_rope import rms_norm, rope
from dsv4.kernels.registry import register


@register("rms_norm_rope", "reference")
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return rope(rms_norm(x.float(), weight, eps), cos, sin, False).to(x.dtype)


@register("mhc_post_pre", "reference")
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
    new = mhc_post(y, streams, post, comb)
    return (new, *mhc_pre(new, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps))
