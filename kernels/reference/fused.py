"""Reference fused ops: the compositions a device backend may implement as one kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4.kernels.reference.mhc import mhc_post, mhc_pre
from dsv4.kernels.reference.norm_rope import rms_norm, rope
from dsv4.kernels.registry import register

PreOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PostPre = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@register("rms_norm_rope", "reference")
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return rope(rms_norm(x.float(), weight, eps), cos, sin, False).to(x.dtype)


def post_then_pre(post_fn: Callable[..., torch.Tensor], pre_fn: Callable[..., PreOutputs]) -> Callable[..., PostPre]:
    """`mhc_post_pre` as a backend's `mhc_post` then its `mhc_pre` on the new streams (what a fused kernel replaces)."""

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
    ) -> PostPre:
        new = post_fn(y, streams, post, comb)
        return (new, *pre_fn(new, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps))

    return mhc_post_pre


register("mhc_post_pre", "reference")(post_then_pre(mhc_post, mhc_pre))
