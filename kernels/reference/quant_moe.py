"""Reference grouped expert matmul over quantized weights: dequantize (FP8 e4m3 with 128x128 block scales, or
MXFP4 e2m1 with per-32 E8M0 scales, the official checkpoint formats) and run the plain grouped matmul.
"""

from __future__ import annotations

import torch

from dsv4.kernels.reference.moe import grouped_matmul
from dsv4.kernels.registry import register

FP8_BLOCK = 128
FP4_BLOCK = 32
# e2m1 code -> value; bit 3 is the sign (OCP MX spec).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight F8_E4M3 [..., O, K], scale [..., ceil(O/128), ceil(K/128)] (E8M0 or F32) -> `dtype` [..., O, K]."""
    o, k = weight.shape[-2:]
    if o % FP8_BLOCK == 0 and k % FP8_BLOCK == 0:  # whole blocks: broadcast the scales, no expanded copy
        blocks = weight.unflatten(-1, (-1, FP8_BLOCK)).unflatten(-3, (-1, FP8_BLOCK)).to(dtype)
        return (blocks * scale.to(dtype)[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)
    s = scale.to(dtype).repeat_interleave(FP8_BLOCK, -2)[..., :o, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
    return weight.to(dtype) * s


def dequant_fp8_experts(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight F8_E4M3 [E, O, K], scale [E, ceil(O/128), ceil(K/128)] (E8M0 or F32) -> fp32 [E, O, K]."""
    return dequant_fp8_blocks(weight, scale, torch.float32)


def dequant_mxfp4_experts(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight I8 [E, O, K/2] (low nibble = even column), scale E8M0 [E, O, K/32] -> fp32 [E, O, K]."""
    b = weight.view(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).long()
    values = torch.tensor(_E2M1, device=weight.device)[codes]
    return values * scale.float().repeat_interleave(FP4_BLOCK, dim=-1)


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
