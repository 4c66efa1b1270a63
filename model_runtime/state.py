"""Per-sequence decoding state of the DeepSeek-V4 model (one object per sequence, never shared).

A `SequenceState` holds `position` (tokens consumed so far) and one `LayerState` per decoder layer (and, for
models loaded with their MTP module, one per MTP layer in `mtp_layers`, with its own `mtp_position`).
Tensors have no batch axis; `dt` is the model dtype, W = sliding_window,
c = head_dim, ic = index_head_dim, m = the layer's compression ratio, coff = 2 for CSA (overlapping) else 1,
cap >= n_entries (grows by doubling):

| tensor        | shape               | dtype | layers   | content                                                   |
|---------------|---------------------|-------|----------|-----------------------------------------------------------|
| `window`      | [W, c]              | dt    | all      | ring of K=V: position p at slot p % W (kv_norm, RoPE,     |
|               |                     |       |          | FP8 round trip of the non-RoPE dims when QAT is on)       |
| `entries`     | [cap, c]            | dt    | CSA, HCA | compressed entries 0..n_entries-1 (entry i covers block i;|
|               |                     |       |          | normed, RoPE at i*m, FP8 round trip when QAT is on)       |
| `index_keys`  | [cap, ic]           | dt    | CSA      | indexer keys (same blocks; Hadamard + FP4 with QAT)       |
| `comp_kv`     | [coff*m, coff*c]    | fp32  | CSA, HCA | compressor partial-block state: projected contents        |
| `comp_score`  | [coff*m, coff*c]    | fp32  | CSA, HCA | gate scores + ape (-inf = empty slot)                     |
| `icomp_kv`    | [2*m, 2*ic]         | fp32  | CSA      | the indexer compressor's state, same layout               |
| `icomp_score` | [2*m, 2*ic]         | fp32  | CSA      |                                                           |

Compressor state layout (as the official code): HCA slots [0, r) hold the r = position % m tokens of the
current, incomplete block. CSA slots [0, m) hold the previous complete block's full 2c-wide projections (its
A halves are pooled into the next entry) and slots [m, m + r) the current block's tokens. A fresh state is
kv = 0, score = -inf. Layers without a compressor keep empty [0, ...] tensors. Only the live rows (those above)
carry meaning: rows past them may hold an older block's values, and nothing reads them.

The engine's batched decode step does not go through these per-sequence objects: `PagedDecode` hands the model
the pool's tensors (`PagedLayerStorage`, batch axis = the pool's slots) and one step's device inputs (positions,
slots, block tables), so a step is a fixed sequence of batched tensor ops, whatever the batch and the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv4.kernels.paged import FORMATS, PagedRows
from dsv4.model_runtime.config import ModelConfig


@dataclass
class LayerState:
    window: torch.Tensor
    entries: torch.Tensor
    index_keys: torch.Tensor
    comp_kv: torch.Tensor
    comp_score: torch.Tensor
    icomp_kv: torch.Tensor
    icomp_score: torch.Tensor
    n_entries: int = 0

    def valid_entries(self) -> torch.Tensor:
        return self.entries[: self.n_entries]

    def valid_index_keys(self) -> torch.Tensor:
        return self.index_keys[: self.n_entries]

    def append_entries(self, entries: torch.Tensor, index_keys: torch.Tensor | None) -> None:
        """Append new compressed entries (and their indexer keys, CSA), growing capacity by doubling."""
        n_new = entries.shape[0]
        need = self.n_entries + n_new
        if need > self.entries.shape[0]:
            cap = max(need, 2 * self.entries.shape[0], 8)
            self.entries = _grow(self.entries, cap)
            if self.index_keys.shape[-1]:
                self.index_keys = _grow(self.index_keys, cap)
        self.entries[self.n_entries : need] = entries
        if index_keys is not None:
            self.index_keys[self.n_entries : need] = index_keys
        self.n_entries = need


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = t.new_zeros(cap, t.shape[-1])
    out[: t.shape[0]] = t
    return out


@dataclass
class SequenceState:
    """The decoding state of one sequence: `position` tokens consumed; per-layer caches (see module doc)."""

    layers: list[LayerState]
    mtp_layers: list[LayerState] = field(default_factory=list)
    position: int = 0
    mtp_position: int = 0  # positions the MTP module has consumed (it runs one step behind the main model)

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (allocated capacity)."""
        total = 0
        for ls in [*self.layers, *self.mtp_layers]:
            for t in (ls.window, ls.entries, ls.index_keys, ls.comp_kv, ls.comp_score, ls.icomp_kv, ls.icomp_score):
                total += t.numel() * t.element_size()
        return total


def new_layer_state(cfg: ModelConfig, layer: int, device: torch.device, dtype: torch.dtype) -> LayerState:
    c, ic, m = cfg.head_dim, cfg.index_head_dim, cfg.ratio(layer)
    coff = 2 if cfg.is_csa(layer) else 1
    f32 = torch.promote_types(dtype, torch.float32)  # fp32 (float64 for float64 precision runs)

    def comp(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = coff * m
        return (
            torch.zeros(rows, width, device=device, dtype=f32),
            torch.full((rows, width), float("-inf"), device=device, dtype=f32),
        )

    comp_kv, comp_score = comp(coff * c)
    icomp_kv, icomp_score = comp(2 * ic) if cfg.is_csa(layer) else comp(0)
    return LayerState(
        window=torch.zeros(cfg.sliding_window, c, device=device, dtype=dtype),
        entries=torch.zeros(0, c, device=device, dtype=dtype),
        index_keys=torch.zeros(0, ic if cfg.is_csa(layer) else 0, device=device, dtype=dtype),
        comp_kv=comp_kv,
        comp_score=comp_score,
        icomp_kv=icomp_kv,
        icomp_score=icomp_score,
    )


def new_sequence_state(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, mtp: bool = False) -> SequenceState:
    """A fresh state (position 0) for one sequence."""
    n = cfg.num_hidden_layers
    return SequenceState(
        layers=[new_layer_state(cfg, i, device, dtype) for i in range(n)],
        mtp_layers=[new_layer_state(cfg, n + i, device, dtype) for i in range(cfg.num_nextn_predict_layers)]
        if mtp
        else [],
    )


@dataclass(frozen=True)
class PagedStore:
    """One store of the paged pool as a decode step writes it: the rows (flat, in a `dsv4.kernels.paged` format),
    the encoder of that format (rows [N, dim] -> field name -> [N, width]), and the flat row that takes the writes
    of rows that store nothing this step (`sink_row`: past the last block, never read)."""

    rows: PagedRows
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    sink_row: int

    def write(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Store values [N, dim] at flat rows [N] (the sink row may repeat)."""
        encoded = self.encode(values)
        for name, t in zip(FORMATS[self.rows.format], self.rows.tensors, strict=True):
            t.index_put_((flat,), encoded[name])


@dataclass(frozen=True)
class PagedLayerStorage:
    """One layer's tensors in the pool, batch axis = pool slot: window rings [slots, W, c], the compressor states
    by name (`comp_kv`, ... as `LayerState`, [slots, rows, width] fp32), the entry and indexer-key stores.
    `sink_slot` is a slot no sequence holds: padding rows of a batch write their window and compressor rows there."""

    window: torch.Tensor
    comp: dict[str, torch.Tensor]
    entries: PagedStore | None
    index_keys: PagedStore | None
    sink_slot: int


class PagedUndo:
    """The pool rows that a step's tentative tokens (an MTP draft, the second token of a verification step)
    overwrite, saved before they are written, so that the rows whose draft is rejected can be put back on the
    device (`restore`), with no host sync: the pool is then exactly as if only their first token had been fed.

    Only what a rejected token destroys is saved: its window-ring row (the key W positions back) and the rows of a
    CSA compressor state that completing a block moves (`Compressor.pool_step`). What else it writes is dead until
    the true token at that position writes it again: the next row of a compressor's current block, and the entry
    of a block that it completes, which no position before it can see."""

    def __init__(self, slots: torch.Tensor, sink_slot: int) -> None:
        self.slots, self.sink_slot = slots, sink_slot
        self._saved: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def save(self, t: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Save t[slots] (t: batch axis = pool slot), or t[slots, rows] with rows [B]."""
        index = (self.slots,) if rows is None else (self.slots, rows)
        self._saved.append((t, rows, t[index]))

    def restore(self, rejected: torch.Tensor) -> None:
        """Put back what the rows of `rejected` [B] bool saved (the others write the sink slot)."""
        keep = torch.where(rejected, self.slots, self.sink_slot)
        for t, rows, values in reversed(self._saved):
            t.index_put_((keep,) if rows is None else (keep, rows), values)


@dataclass(frozen=True)
class PagedDecode:
    """S tokens per row over the paged pool (S = 1: a decode step; 2: an MTP verification step, whose second
    token is tentative): the step's device inputs and the pool's layers.

    positions [B] int64 (the position of the first token each row feeds), slots [B] int64 (the row's pool slot, or
    `sink_slot` for a padding row), block_tables [B, T] int32 (the row's blocks; padding rows any valid ids).
    `undo`: where the writes of tentative tokens save what they overwrite (None: no token is tentative)."""

    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    layers: list[PagedLayerStorage]
    undo: PagedUndo | None = None

    def layer(self, i: int) -> PagedLayerView:
        return PagedLayerView(self, self.layers[i])


@dataclass(frozen=True)
class PagedLayerView:
    """What a decoder layer sees of a `PagedDecode`: the step and its own storage."""

    step: PagedDecode
    storage: PagedLayerStorage
