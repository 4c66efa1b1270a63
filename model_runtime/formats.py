"""The official weight formats: FP8 e4m3 with 128x128 UE8M0 block scales, MXFP4 (I8-packed e2m1, per-32 E8M0).

One decode function per format (what the loader uses) and its exact inverse for writing checkpoints.
Scales are powers of two (`scale_fmt = ue8m0`): `s = 2^ceil(log2(amax / qmax))`.
"""

from __future__ import annotations

import functools

import torch

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 code -> value; bit 3 is the sign.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


@functools.cache
def e2m1_values(device: torch.device) -> torch.Tensor:
    """`E2M1_VALUES` on `device`, copied once (a copy per call is a host-to-device transfer in every decode step,
    which a CUDA graph cannot capture)."""
    return E2M1_VALUES.to(device)


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """2^ceil(log2(amax / qmax)) in fp32, exact (frexp gives the exponent; a mantissa of 0.5 is already a power)."""
    mant, exp = torch.frexp(amax.float() / qmax)
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), torch.where(mant == 0.5, exp - 1, exp))


def fp8_block_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the `.scale` of an FP8 weight [out, in]: one scale per 128x128 block."""
    return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))


def fp4_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the `.scale` of an MXFP4 weight of logical shape [out, in]: one scale per 32 input columns."""
    return (out_features, in_features // FP4_BLOCK)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[n, k] = e4m3(Wq[n, k]) * S[n // 128, k // 128]; weight F8_E4M3 [out, in], scale E8M0/F32 [ceil/128]."""
    out_f, in_f = weight.shape
    s = scale.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * s).to(dtype)


def quant_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequant_fp8: (F8_E4M3 weight, F8_E8M0 scale) with power-of-two scales per 128x128 block."""
    out_f, in_f = w.shape
    so, si = fp8_block_scale_shape(out_f, in_f)
    padded = torch.zeros(so * FP8_BLOCK, si * FP8_BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(so, FP8_BLOCK, si, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-30)
    scale = pow2_scale(amax, FP8_MAX)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(so * FP8_BLOCK, si * FP8_BLOCK)
    return q[:out_f, :in_f].to(torch.float8_e4m3fn).contiguous(), scale.to(torch.float8_e8m0fnu)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4: packed I8 [out, in/2] (low nibble = even column) and E8M0 scale [out, in/32] -> [out, in]."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).long()  # [out, in]
    values = e2m1_values(packed.device)[codes]
    return (values * scale.float().repeat_interleave(FP4_BLOCK, dim=1)).to(dtype)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of x (already clamped to [-6, 6]), ties to the even code (0.25->0, 0.75->1, 2.5->2, 5->4)."""
    # The code is the number of midpoints below |x|; at a midpoint the tie goes to the even neighbour, i.e. up
    # when the lower neighbour's code is odd (0.75, 1.75, 3.5) and down otherwise (0.25, 1.25, 2.5, 5). One
    # bucketize counts them: the midpoints that count when equal are moved down by one fp32 ulp.
    code = torch.bucketize(x.abs().float(), _e2m1_midpoints(x.device), right=False)
    return code | (((x < 0) & (code > 0)).long() << 3)


@functools.cache
def _e2m1_midpoints(device: torch.device) -> torch.Tensor:
    strict = torch.tensor([0.25, 1.25, 2.5, 5.0])
    inclusive = torch.tensor([0.75, 1.75, 3.5])
    return torch.cat([strict, torch.nextafter(inclusive, torch.zeros(()))]).sort().values.to(device)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the e2m1 grid (round to nearest, ties to the even code); x must lie in [-6, 6]."""
    return e2m1_values(x.device)[e2m1_codes(x.float())].to(x.dtype)


def quant_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequant_fp4: (I8 packed [out, in/2], F8_E8M0 scale [out, in/32]); power-of-two scales."""
    out_f, in_f = w.shape
    blocks = w.float().view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    scale = pow2_scale(blocks.abs().amax(-1).clamp(min=FP4_MAX * 2.0**-126), FP4_MAX)
    codes = e2m1_codes((blocks / scale[..., None]).clamp(-FP4_MAX, FP4_MAX)).view(out_f, in_f)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed.contiguous(), scale.to(torch.float8_e8m0fnu)
