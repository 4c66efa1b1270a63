"""Reference mHC (manifold-constrained hyper-connections): pre, post, Sinkhorn and the hyper head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.registry import register


def _mix(streams: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    A = accumulation_dtype(streams)
    v = streams.flatten(-2).to(A)  # [N, n*d]
    v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(v, fn.to(A))


@register("sinkhorn", "reference")
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    comb = torch.softmax(logits, dim=-1).add_(eps)
    # Column, then (iters - 1) x (row, column) normalisations, each x / (sum + eps); in place to save allocations.
    for dim in [-2] + [-1, -2] * (iters - 1):
        comb.div_(comb.sum(dim=dim, keepdim=True).add_(eps))
    return comb


@register("mhc_pre", "reference")
def mhc_pre(
    streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A = accumulation_dtype(streams)
    n = streams.shape[-2]
    mu = _mix(streams, fn, norm_eps)  # [N, (2+n)*n]
    mu_pre, mu_post, mu_res = mu.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_res = base.to(A).split([n, n, n * n])
    s = scale.to(A)
    pre = torch.sigmoid(mu_pre * s[0] + b_pre) + hc_eps
    post = 2 * torch.sigmoid(mu_post * s[1] + b_post)
    logits = mu_res.view(*mu_res.shape[:-1], n, n) * s[2] + b_res.view(n, n)
    comb = sinkhorn(logits, sinkhorn_iters, hc_eps)
    x = (pre.unsqueeze(-1) * streams.to(A)).sum(dim=-2).to(streams.dtype)
    return x, post, comb


@register("mhc_post", "reference")
def mhc_post(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    A = accumulation_dtype(streams)
    dt = streams.dtype
    out = post.unsqueeze(-1) * y.to(A).unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams.to(A))
    return out.to(dt)


@register("hc_head", "reference")
def hc_head(
    streams: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float, norm_eps: float
) -> torch.Tensor:
    A = accumulation_dtype(streams)
    w = torch.sigmoid(_mix(streams, fn, norm_eps) * scale.to(A) + base.to(A)) + hc_eps
    return (w.unsqueeze(-1) * streams.to(A)).sum(dim=-2).to(streams.dtype)
