"""Reference grouped expert matmul over quantized weights: dequantize (FP8 e4m3 with 128x128 block scales, or
MXFP4 e2m1 with per-32 E8M0 scales, the official checkpoint formats) and run the plain grouped matmul.
"""

from __future__ import annotations

import functools

import torch

from dsv4.kernels.reference.moe import grouped_matmul
from dsv4.kernels.registry import register

FP8_BLOCK = 128
FP4_BLOCK = 32
# e2m1 code -> value; bit 3 is the sign (OCP MX spec).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """[256] fp32: the value of every e4m3 byte (a table lookup is several times faster than the dtype cast)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def _lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """table[codes] for uint8 codes, rows of `table` per code: [*codes.shape, *table.shape[1:]]."""
    flat = table.index_select(0, codes.reshape(-1).int())
    return flat.view(*codes.shape, *table.shape[1:])


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight F8_E4M3 [..., O, K], scale [..., ceil(O/128), ceil(K/128)] (E8M0 or F32) -> `dtype` [..., O, K]."""
    o, k = weight.shape[-2:]
    values = _lookup(_e4m3_values(weight.device), weight.view(torch.uint8))  # fp32, exact
    s = scale.float()
    if o % FP8_BLOCK == 0 and k % FP8_BLOCK == 0:  # whole blocks: broadcast the scales, no expanded copy
        blocks = values.unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK))
        w = (blocks * s[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)
    else:
        w = values * s.repeat_interleave(FP8_BLOCK, -2)[..., :o, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
    return w if dtype == torch.float32 else w.to(dtype)


def dequant_fp8_experts(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight F8_E4M3 [E, O, K], scale [E, ceil(O/128), ceil(K/128)] (E8M0 or F32) -> fp32 [E, O, K]."""
    return dequant_fp8_blocks(weight, scale, torch.float32)


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two e2m1 values (low nibble, high nibble) of every byte."""
    e2m1 = torch.tensor(E2M1_VALUES)
    b = torch.arange(256)
    return torch.stack([e2m1[b & 0x0F], e2m1[b >> 4]], dim=-1).to(device)


def dequant_mxfp4_experts(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight I8 [E, O, K/2] (low nibble = even column), scale E8M0 [E, O, K/32] -> fp32 [E, O, K]."""
    values = _lookup(_byte_values(weight.device), weight.view(torch.uint8))  # one lookup per byte: [E, O, K/2, 2]
    blocks = values.view(*weight.shape[:-1], -1, FP4_BLOCK)  # [E, O, K/32, 32]
    return (blocks * scale.float()[..., None]).flatten(-2)


@register("grouped_matmul_fp8", "reference")
def grouped_matmul_fp8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return grouped_matmul(x, dequant_fp8_experts(weight, scale).to(x.dtype), group_ends)


@register("grouped_matmul_mxfp4", "reference")
def grouped_matmul_mxfp4(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return grouped_matmul(x, dequant_mxfp4_experts(weight, scale).to(x.dtype), group_ends)
