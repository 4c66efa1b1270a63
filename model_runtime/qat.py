"""The official quantization-aware simulations (in-place "quantize then dequantize" of the reference code).

`q8`: FP8 e4m3 round trip in blocks of 64 (window K=V and compressed entries, non-RoPE dims);
`q4`: FP4 e2m1 round trip in blocks of 32 (indexer queries and keys, after `hadamard`).
Scales are powers of two: s = 2^ceil(log2(amax * (1/qmax))), with the fp32 constant 1/qmax as the official code
multiplies by it. See oracle_notes.md §3.
"""

from __future__ import annotations

import functools

import torch

from dsv4.model_runtime.formats import FP4_MAX, FP8_MAX, e2m1_round, pow2_scale

Q8_BLOCK = 64
Q4_BLOCK = 32
Q8_AMAX_MIN = 1e-4
Q4_AMAX_MIN = FP4_MAX * 2.0**-126


def _fp32(value: float) -> float:
    """`value` rounded to the nearest fp32 (an fp32 tensor times it then multiplies by that fp32 constant)."""
    return torch.tensor(value, dtype=torch.float32).item()


# 1/qmax as the fp32 constants of the official code, made once: a tensor made per call would be a host-side
# allocation inside every decode step
_INVERSE = {FP8_MAX: _fp32(1.0 / FP8_MAX), FP4_MAX: _fp32(1.0 / FP4_MAX)}


def _block_scale(xb: torch.Tensor, amax_min: float, qmax: float) -> torch.Tensor:
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=amax_min)
    return pow2_scale(amax * _INVERSE[qmax], 1.0)


def q8(x: torch.Tensor, block: int = Q8_BLOCK) -> torch.Tensor:
    """FP8 e4m3 round trip over blocks of `block` along the last axis (round to nearest even); x.dtype out."""
    xb = x.float().unflatten(-1, (-1, block))
    s = _block_scale(xb, Q8_AMAX_MIN, FP8_MAX)
    y = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return y.flatten(-2).to(x.dtype)


def q4(x: torch.Tensor, block: int = Q4_BLOCK) -> torch.Tensor:
    """FP4 e2m1 round trip over blocks of `block` along the last axis (ties to the even code); x.dtype out."""
    xb = x.float().unflatten(-1, (-1, block))
    s = _block_scale(xb, Q4_AMAX_MIN, FP4_MAX)
    y = e2m1_round((xb / s).clamp(-FP4_MAX, FP4_MAX)) * s
    return y.flatten(-2).to(x.dtype)


@functools.cache
def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester order
    return (h * n**-0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester-ordered Walsh-Hadamard transform over the last axis (a power of two); self-inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard: last axis must be a power of two, got {n}")
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) @ _hadamard_matrix(n, x.device).to(acc)).to(x.dtype)


def q8_nope(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """q8 on the non-RoPE dims (all but the last `rope_dim`); the RoPE dims pass through unchanged."""
    return torch.cat([q8(x[..., :-rope_dim]), x[..., -rope_dim:]], dim=-1)


def q4_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The indexer's simulation: q4(hadamard(x)) over the whole last axis."""
    return q4(hadamard(x))
