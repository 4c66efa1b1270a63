"""Rows of the paged KV pool as the paged kernel ops read them in place: the storage formats and the addressing.

A store holds fixed-width rows in pages of `rows_per_block` rows; its tensors are flat over (block, row in block),
so row r of block b is flat row `b * rows_per_block + r`. A sequence's rows are numbered 0, 1, ... and its block
table maps row e to block `table[e // rows_per_block]`. Each store may have spare flat rows past the last block
(the engine's write sink); the paged ops never read them.

Formats (the engine's `kv_layout` writes them; each op decodes exactly what that writes):

* `PLAIN`: one tensor `value` [P, D] in the model dtype.
* `FP8_NOPE` (compressed K=V entries): `fp8` [P, D-R] uint8 holding e4m3 bits, `scale` [P, (D-R)/64] uint8
  holding UE8M0 exponents (one power of two per 64 dims), `rope` [P, R] in the model dtype. The decoded row is
  `[e4m3(fp8) * 2^(scale-127) (rounded to the model dtype) | rope]`.
* `MXFP4` (CSA indexer keys): `fp4` [P, D/2] uint8 (two e2m1 codes a byte, low nibble = even dim), `scale`
  [P, D/32] uint8 UE8M0. The decoded row is `e2m1(code) * 2^(scale-127)`, rounded to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLAIN = "plain"
FP8_NOPE = "fp8_nope"
MXFP4 = "mxfp4"
FP8_SCALE_BLOCK = 64
FP4_SCALE_BLOCK = 32
FORMATS = {PLAIN: ("value",), FP8_NOPE: ("fp8", "scale", "rope"), MXFP4: ("fp4", "scale")}


@dataclass(frozen=True)
class PagedRows:
    """One store of the pool: its format, its flat tensors (in the format's field order), its page size and the
    width and dtype of a decoded row."""

    format: str
    tensors: tuple[torch.Tensor, ...]
    rows_per_block: int
    dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        fields = FORMATS.get(self.format)
        if fields is None:
            raise ValueError(f"PagedRows: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        if len(self.tensors) != len(fields):
            raise ValueError(f"PagedRows {self.format}: {len(self.tensors)} tensors, the format has {fields}")
        if self.rows_per_block < 1:
            raise ValueError(f"PagedRows: rows_per_block must be >= 1, got {self.rows_per_block}")

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def flat_rows(self, block_tables: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Flat row of each sequence row: block_tables [B, T], rows [B, K] (>= 0, < T * rows_per_block) -> [B, K]."""
        blocks = torch.gather(block_tables.long(), 1, rows // self.rows_per_block)
        return blocks * self.rows_per_block + rows % self.rows_per_block
