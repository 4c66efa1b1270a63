"""Reference fused ops: the compositions a device backend may implement as one kernel."""

from __future__ import annotations

import torch

from dsv4.kernels.reference.norm_rope import rms_norm, rope
from dsv4.kernels.registry import register


@register("rms_norm_rope", "reference")
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return rope(rms_norm(x.float(), weight, eps), cos, sin, False).to(x.dtype)
