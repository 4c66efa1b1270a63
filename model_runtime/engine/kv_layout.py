"""Storage formats of the paged KV pool, and the bytes per token they cost.

With the QAT simulation on, the model rounds what it stores exactly as the reference does, so the pool keeps
those values in the low precision they already fit, losslessly:

* compressed K=V entries: the non-RoPE dims as FP8 e4m3 with one power-of-two (UE8M0) scale per 64 dims, the
  RoPE dims in the model dtype (448 + 7 + 64 x 2 = 583 bytes per entry in BF16, vLLM's fp8_ds_mla is 584);
* CSA indexer keys: MXFP4 (e2m1 pairs packed in a byte, one UE8M0 scale per 32 dims): 64 + 4 = 68 bytes.

Without QAT the values are unrounded, so they are kept in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels import paged
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.formats import FP8_MAX, dequant_fp4, pow2_scale, quant_fp4
from dsv4.model_runtime.qat import Q8_BLOCK

E8M0_BIAS = 127


@dataclass(frozen=True)
class Field:
    """One stored tensor of a row format: `width` elements of `dtype` per row."""

    name: str
    dtype: torch.dtype
    width: int

    @property
    def nbytes(self) -> int:
        return self.width * torch.empty(0, dtype=self.dtype).element_size()


class RowCodec:
    """How rows of `width` values of the model dtype are stored: the fields, and the exact encode / decode.
    `format` names the layout for the paged kernel ops (`dsv4.kernels.paged`), whose decode matches `decode`."""

    format = paged.PLAIN

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.width, self.dtype = width, dtype

    @property
    def fields(self) -> list[Field]:
        return [Field("value", self.dtype, self.width)]

    @property
    def row_bytes(self) -> int:
        return sum(f.nbytes for f in self.fields)

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"value": rows.to(self.dtype)}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored["value"]


class FP8NopeCodec(RowCodec):
    """FP8 e4m3 non-RoPE dims with a UE8M0 scale per 64, RoPE dims in the model dtype."""

    format = paged.FP8_NOPE

    def __init__(self, width: int, dtype: torch.dtype, rope_dim: int) -> None:
        super().__init__(width, dtype)
        self.nope, self.rope = width - rope_dim, rope_dim

    @property
    def fields(self) -> list[Field]:
        return [
            Field("fp8", torch.uint8, self.nope),
            Field("scale", torch.uint8, self.nope // Q8_BLOCK),
            Field("rope", self.dtype, self.rope),
        ]

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks = rows[:, : self.nope].float().unflatten(-1, (-1, Q8_BLOCK))
        # The smallest power of two that fits the block: exact for values the QAT round trip produced.
        scale = pow2_scale(blocks.abs().amax(-1, keepdim=True).clamp(min=FP8_MAX * 2.0**-120), FP8_MAX)
        q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
        exponent = torch.frexp(scale)[1].squeeze(-1) - 1 + E8M0_BIAS
        return {
            "fp8": q.view(torch.uint8),
            "scale": exponent.to(torch.uint8),
            "rope": rows[:, self.nope :].to(self.dtype),
        }

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = stored["scale"].view(torch.float8_e8m0fnu).float()
        nope = stored["fp8"].view(torch.float8_e4m3fn).float().unflatten(-1, (-1, Q8_BLOCK)) * scale[..., None]
        return torch.cat([nope.flatten(-2).to(self.dtype), stored["rope"]], dim=-1)


class FP4Codec(RowCodec):
    """MXFP4: e2m1 codes packed two per byte (low nibble first) and a UE8M0 scale per 32 values."""

    format = paged.MXFP4

    @property
    def fields(self) -> list[Field]:
        return [Field("fp4", torch.uint8, self.width // 2), Field("scale", torch.uint8, self.width // 32)]

    def encode(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scale = quant_fp4(rows.float())
        return {"fp4": packed.view(torch.uint8), "scale": scale.view(torch.uint8)}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequant_fp4(stored["fp4"].view(torch.int8), stored["scale"].view(torch.float8_e8m0fnu), self.dtype)


def entry_codec(cfg: ModelConfig, dtype: torch.dtype, low_precision: bool) -> RowCodec:
    """The format of compressed K=V entries."""
    if low_precision:
        return FP8NopeCodec(cfg.head_dim, dtype, cfg.qk_rope_head_dim)
    return RowCodec(cfg.head_dim, dtype)


def index_key_codec(cfg: ModelConfig, dtype: torch.dtype, low_precision: bool) -> RowCodec:
    """The format of CSA indexer keys."""
    return FP4Codec(cfg.index_head_dim, dtype) if low_precision else RowCodec(cfg.index_head_dim, dtype)


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, low_precision: bool) -> float:
    """Pool bytes per context token: compressed entries and indexer keys of every layer (m positions per entry)."""
    entry = entry_codec(cfg, dtype, low_precision).row_bytes
    key = index_key_codec(cfg, dtype, low_precision).row_bytes
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        m = cfg.ratio(i)
        if m:
            total += (entry + (key if cfg.is_csa(i) else 0)) / m
    return total


def sequence_constant_bytes(cfg: ModelConfig, dtype: torch.dtype, mtp_layers: int = 0) -> int:
    """Per-sequence bytes independent of its length: window rings and compressors' partial-block state (fp32) of
    the decoder layers and of `mtp_layers` MTP layers."""
    esize = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for i in range(cfg.num_hidden_layers + mtp_layers):
        total += cfg.sliding_window * cfg.head_dim * esize
        m = cfg.ratio(i)
        if m:
            coff = 2 if cfg.is_csa(i) else 1
            total += 2 * coff * m * coff * cfg.head_dim * 4
            if cfg.is_csa(i):
                total += 2 * 2 * m * 2 * cfg.index_head_dim * 4
    return total
