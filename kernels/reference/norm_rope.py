"""Reference RMSNorm, interleaved RoPE and clamped SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.registry import register


@register("rms_norm", "reference")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    A = accumulation_dtype(x)
    xf = x.to(A)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.to(A) * y
    return y.to(x.dtype)


@register("rope", "reference")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    A = accumulation_dtype(x)
    r = 2 * cos.shape[-1]
    extra = x.dim() - 3  # head axes between S and D
    shape = (*cos.shape[:2], *([1] * extra), cos.shape[-1])
    c, s = cos.view(shape), sin.view(shape)
    if inverse:
        s = -s
    rot = x[..., -r:].to(A)
    even, odd = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], out.to(x.dtype)], dim=-1)


@register("swiglu", "reference")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, row_scale: torch.Tensor | None) -> torch.Tensor:
    A = accumulation_dtype(gate)
    h = F.silu(gate.to(A).clamp(max=limit)) * up.to(A).clamp(min=-limit, max=limit)
    if row_scale is not None:
        h = h * row_scale.to(A).unsqueeze(-1)
    return h.to(gate.dtype)
