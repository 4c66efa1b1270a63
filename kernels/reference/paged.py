"""Reference paged decode ops: read the KV pool in place through block tables (`dsv4.kernels.paged`).

Attention gathers and decodes only the rows it reads: the window ring's W rows and the selected entries. The
indexer decodes every key the row's block table covers: that scoring pass is the one part of a decode step that
grows with the context.
"""

from __future__ import annotations

import functools

import torch

from dsv4.kernels.paged import FP4_SCALE_BLOCK, FP8_NOPE, FP8_SCALE_BLOCK, MXFP4, PLAIN, PagedRows
from dsv4.kernels.reference._dtypes import accumulation_dtype
from dsv4.kernels.reference.attention import indexer_topk, softmax_with_sink
from dsv4.kernels.reference.quant_moe import E2M1_VALUES
from dsv4.kernels.registry import register


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    # One copy per device: a host-to-device copy per call would be a transfer inside every decode step.
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def decode_rows(rows: PagedRows, flat: torch.Tensor) -> torch.Tensor:
    """The decoded rows at flat indices `flat` [...] -> [..., dim] in `rows.dtype` (exactly the engine's codecs)."""
    if rows.format == PLAIN:
        return rows.tensors[0][flat]
    if rows.format == FP8_NOPE:
        fp8, scale, rope = (t[flat] for t in rows.tensors)
        s = scale.view(torch.float8_e8m0fnu).float()
        nope = fp8.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, FP8_SCALE_BLOCK)) * s[..., None]
        return torch.cat([nope.flatten(-2).to(rows.dtype), rope], dim=-1)
    if rows.format == MXFP4:
        packed, scale = (t[flat] for t in rows.tensors)
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).long()
        values = _e2m1_table(packed.device)[codes]
        return (values * scale.view(torch.float8_e8m0fnu).float().repeat_interleave(FP4_SCALE_BLOCK, -1)).to(rows.dtype)
    raise ValueError(f"decode_rows: unknown format {rows.format!r}")


def window_keys(
    window: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring rows of positions t-W+1..t (oldest first) of each row: ([B, W, D], valid [B, W])."""
    w = window.shape[1]
    p = positions[:, None] - (w - 1) + torch.arange(w, device=positions.device)
    return window[slots[:, None], p % w], p >= 0


def gather_rows(
    window: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entries: PagedRows | None,
    block_tables: torch.Tensor,
    entry_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a paged decode attention reads, decoded: (keys [B, W+K, D], valid [B, W+K]); window rows first."""
    keys, valid = window_keys(window, slots, positions)
    if entries is not None and entry_idx is not None and entry_idx.shape[-1]:
        flat = entries.flat_rows(block_tables, entry_idx.clamp(min=0))
        keys = torch.cat([keys, decode_rows(entries, flat).to(keys.dtype)], dim=1)
        valid = torch.cat([valid, entry_idx >= 0], dim=1)
    return keys, valid


def all_keys(keys: PagedRows, block_tables: torch.Tensor) -> torch.Tensor:
    """Every row the block tables cover, decoded: [B, T * rows_per_block, D]."""
    b, n_rows = block_tables.shape[0], block_tables.shape[1] * keys.rows_per_block
    rows = torch.arange(n_rows, device=block_tables.device).expand(b, n_rows)
    return decode_rows(keys, keys.flat_rows(block_tables, rows))


@register("paged_sparse_attention", "reference")
def paged_sparse_attention(
    q: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entries: PagedRows | None,
    block_tables: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    A = accumulation_dtype(q)
    keys, valid = gather_rows(window, slots, positions, entries, block_tables, entry_idx)
    values = keys.to(A)
    scores = torch.einsum("bhd,bkd->bhk", q.to(A), values) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    out = softmax_with_sink(scores[:, None], sink.to(A), values, "bshk,bkd->bshd")
    return out[:, 0].to(q.dtype)


@register("paged_indexer_topk", "reference")
def paged_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: PagedRows,
    block_tables: torch.Tensor,
    visible: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    return indexer_topk(q[:, None], weights[:, None], all_keys(keys, block_tables), visible[:, None], topk)[:, 0]
