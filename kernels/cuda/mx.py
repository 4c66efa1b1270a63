"""The in-register decoders of the packed formats every `cuda` kernel reads: E8M0 scales, e2m1 (MXFP4) nibbles
and e4m3fn (FP8) bytes, each to fp32. One place, shared by the grouped matmul, the decode-shaped grouped GEMV,
the FP8 projection and the paged ops.

e2m1 and e4m3 go through an fp16 bit pattern: their exponent and mantissa bits, moved into fp16's low exponent and
high mantissa bits, make an fp16 number equal to the value times a power of two (2^-14 for e2m1, 2^-8 for e4m3),
subnormals included, because fp16's subnormal step matches theirs under that shift. The fp16 -> fp32 conversion is
exact, so a code costs a few integer ops, one conversion and one multiply by a constant, with no select on the
exponent (the decode is the inner loop of the dequantizing GEMV and GEMM kernels, so its op count matters).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def scale_operand(scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A packed weight's scales as the kernels take them, and whether they are E8M0 (passed as their bytes, decoded
    in the kernel by `e8m0`; any other dtype is passed as fp32)."""
    is_e8m0 = scale.dtype == torch.float8_e8m0fnu
    return (scale.view(torch.uint8) if is_e8m0 else scale.float()).contiguous(), is_e8m0


@triton.jit
def e8m0(bits):
    """E8M0 byte -> fp32 power of two (code 0 is 2^-127, a subnormal)."""
    b = bits.to(tl.int32) & 0xFF
    return tl.where(b == 0, tl.full(b.shape, 0x00400000, tl.int32), b << 23).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_fp16_image(code):
    """e2m1 nibble (int32, bits 3..0: sign, 2-bit exponent with bias 1, mantissa) -> fp32 value * 2^-14."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def e2m1(code):
    """e2m1 nibble (int32, low 4 bits) -> fp32; exponent 0 is subnormal (0.5 * mantissa)."""
    return e2m1_fp16_image(code) * 16384.0  # 2^14


@triton.jit
def e4m3(bits):
    """e4m3fn byte -> fp32: bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0 mantissa; exponent 0 is subnormal.
    (0x7F / 0xFF, the format's NaN, decodes as 480: no stored weight or pool entry holds it, writers clamp to 448.)"""
    b = bits.to(tl.int32) & 0xFF
    fp16 = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
    return fp16.to(tl.float32) * 256.0  # 2^8
