"""How checkpoint tensors are stored, and what that costs in bytes (torch-free, so `dsv4 plan` and the operator
can count without importing torch).

Formats: "fp8" (F8_E4M3 weight plus one E8M0 scale per 128x128 block), "fp4" (MXFP4: two e2m1 codes per I8 byte
plus one E8M0 scale per 32 input columns), and the plain element types "bf16", "f16", "f32", "i64", "i32". A
schema kind (`schema.Kind`) says what a tensor is; its format says how one checkpoint stores it: released
checkpoints store kind "fp8" as "fp8" and kind "fp4" as "fp4", unquantized ones store both as "bf16".
"""

from __future__ import annotations

import math
from typing import Literal

FP8_BLOCK = 128  # FP8 weights: one scale per 128 x 128 block (rows and columns)
FP4_BLOCK = 32  # MXFP4 weights: one scale per 32 input columns of a row

Format = Literal["fp8", "fp4", "bf16", "f16", "f32", "i64", "i32"]

# safetensors dtype names of the plain formats, and their element sizes
SAFETENSORS_DTYPE: dict[str, str] = {"bf16": "BF16", "f16": "F16", "f32": "F32", "i64": "I64", "i32": "I32"}
ELEMENT_BYTES: dict[str, int] = {"bf16": 2, "f16": 2, "f32": 4, "i64": 8, "i32": 4}


def fp8_block_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the `.scale` of an FP8 weight [out, in]: one scale per 128x128 block."""
    return (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))


def fp4_scale_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the `.scale` of an MXFP4 weight of logical shape [out, in]: one scale per 32 input columns."""
    return (out_features, in_features // FP4_BLOCK)


def released_format(kind: str, quantized: bool) -> Format:
    """The format a checkpoint stores a tensor of schema kind `kind` in (quantized = released FP8/MXFP4)."""
    if kind == "fp8":
        return "fp8" if quantized else "bf16"
    if kind == "fp4":
        return "fp4" if quantized else "bf16"
    if kind in ("bf16", "f32", "i64"):
        return kind  # type: ignore[return-value]
    raise ValueError(f"unknown tensor kind {kind!r}")


def stored_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes one tensor of logical shape `shape` takes in format `fmt`, its `.scale` included."""
    n = math.prod(shape)
    if fmt == "fp8":
        return n + math.prod(fp8_block_scale_shape(*shape))
    if fmt == "fp4":
        return n // 2 + math.prod(fp4_scale_shape(*shape))
    return n * ELEMENT_BYTES[fmt]


def weight_class(fmt: str) -> str:
    """The class `dsv4 plan` reports a format's bytes under: FP8, MXFP4, or 16/32-bit and integer tensors."""
    return {"fp8": "fp8", "fp4": "mxfp4"}.get(fmt, "bf16" if fmt in ("bf16", "f16") else "other")
