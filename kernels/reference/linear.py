"""Reference projection over a weight kept as stored: a float weight, or FP8 e4m3 with 128x128 block scales,
dequantized on the fly for each call (the CPU and test path; device backends decode inside their kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.reference.quant_moe import dequant_fp8_blocks
from dsv4.kernels.registry import register


@register("linear", "reference")
def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype | None
) -> torch.Tensor:
    out = out_dtype or x.dtype
    # e4m3 values times a power of two are exact in any float dtype the model computes in
    w = weight if scale is None else dequant_fp8_blocks(weight, scale, x.dtype)
    if w.dtype == x.dtype and out == x.dtype:
        return F.linear(x, w)
    acc = torch.promote_types(accumulation_dtype(x), out)
    return F.linear(x.to(acc), w.to(acc)).to(out)
