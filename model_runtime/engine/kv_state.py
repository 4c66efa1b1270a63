"""The paged KV pool of the engine and the per-sequence V4 state it backs.

Two kinds of storage, both shared by all sequences of the engine:

* blocks: a block covers `block_size` token positions of one sequence and holds, for every compressed layer,
  the compressed entries of those positions (block_size / m per layer) and, for CSA layers, their indexer keys,
  in the formats of `kv_layout` (FP8 entries and MXFP4 keys when the model runs the QAT simulation). A sequence
  at n tokens holds ceil(n / block_size) blocks, listed in its block table.
* slots: what a running sequence needs whatever its length: per layer the sliding-window ring (W x c, model
  dtype) and the compressors' partial-block state (fp32), as `dsv4.model_runtime.state` lays them out.

`PagedSequenceState` gives the model the interface of `SequenceState` over that storage (window and compressor
tensors are views of the sequence's slot; entries are gathered from its blocks and decoded), so the model's
per-sequence path (prefill) runs unchanged on it. The batched decode step reads and writes the same storage
through `KVPool.storage` (`dsv4.model_runtime.state.PagedDecode`) and the block tables on the device
(`KVPool.block_tables`, one row per slot, updated incrementally as sequences take blocks).

Every store has one spare flat row past its blocks and the pool one spare slot (`sink_row`, `sink_slot`): a
decode step writes every row of the batch unconditionally, and a row with nothing to store this step (no block
completed, or a padding row of a CUDA graph batch) writes there. Nothing reads them, and the accounting
(`block_bytes`, `slot_bytes`) leaves them out.
"""

from __future__ import annotations

import math
from array import array
from typing import TYPE_CHECKING, Any

import torch

from dsv4.kernels.paged import PagedRows
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.engine.kv_layout import RowCodec, entry_codec, index_key_codec
from dsv4.model_runtime.engine.prefix_cache import CacheEntry, PrefixCache, Prompt
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.transfer import to_device
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import LayerState, PagedLayerStorage, PagedStore, SequenceState

if TYPE_CHECKING:  # the KV blob format needs crc32c, which the bare GPU machine of bench/gpu.sh lacks
    from dsv4.model_runtime.engine.kv_export import KVSnapshot

# A write to the pool's storage outside the model's forward pass, as a rank group's followers replay it on their own
# pools (`parallel/engine_group.py`): ("reset_slot", slot), ("copy_slot", src, dst), ("copy_block", src, dst) or
# ("restore", snapshot, slot, blocks).
PoolWrite = tuple[Any, ...]


class BlockStore:
    """Rows of one codec in [num_blocks, rows_per_block] pages (plus the sink row, past the last page)."""

    def __init__(self, codec: RowCodec, num_blocks: int, rows_per_block: int, device: torch.device) -> None:
        self.codec, self.rows_per_block = codec, rows_per_block
        self.sink_row = num_blocks * rows_per_block
        # flat [pages * rows + 1, width]: what the paged kernel ops index; `tensors` views the pages only
        self.flat = {
            f.name: torch.zeros(self.sink_row + 1, f.width, dtype=f.dtype, device=device) for f in codec.fields
        }
        self.tensors = {
            name: t[: self.sink_row].view(num_blocks, rows_per_block, t.shape[-1]) for name, t in self.flat.items()
        }

    def _where(self, table: list[int], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.tensor(table, dtype=torch.long, device=rows.device)[rows // self.rows_per_block]
        return blocks, rows % self.rows_per_block

    def write(self, table: list[int], first: int, values: torch.Tensor) -> None:
        rows = torch.arange(first, first + values.shape[0], device=values.device)
        blocks, offsets = self._where(table, rows)
        for name, data in self.codec.encode(values).items():
            self.tensors[name][blocks, offsets] = data

    def read(self, table: list[int], n: int) -> torch.Tensor:
        device = next(iter(self.tensors.values())).device
        blocks, offsets = self._where(table, torch.arange(n, device=device))
        return self.codec.decode({name: t[blocks, offsets] for name, t in self.tensors.items()})

    def copy_block(self, src: int, dst: int) -> None:
        for t in self.tensors.values():
            t[dst].copy_(t[src])

    def paged(self, dtype: torch.dtype) -> PagedStore:
        """The store as the batched decode step writes and the paged kernel ops read it."""
        rows = PagedRows(
            self.codec.format,
            tuple(self.flat[f.name] for f in self.codec.fields),
            self.rows_per_block,
            self.codec.width,
            dtype,
        )
        return PagedStore(rows, self.codec.encode, self.sink_row)

    @property
    def block_bytes(self) -> int:
        return self.rows_per_block * self.codec.row_bytes


class KVPool:
    """All KV storage of one engine: `num_blocks` blocks of `block_size` positions and `num_slots` slots (plus the
    sink slot `num_slots`), and the block table of every slot on the device ([num_slots + 1, max_blocks] int32;
    the sink slot's row stays 0). `snapshot_slots` more slots, past the sink, hold the prefix cache's copies of
    sequence slots (`snapshot_slot_ids`); no sequence runs in them, so they have no block table."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        low_precision: bool,
        mtp_layers: int = 0,
        snapshot_slots: int = 0,
    ) -> None:
        self.cfg, self.block_size, self.dtype = cfg, block_size, dtype
        self.mtp_layers, self.sink_slot = mtp_layers, num_slots
        self.snapshot_slot_ids = range(num_slots + 1, num_slots + 1 + snapshot_slots)
        # + 1: an MTP draft may stand one position past the longest request
        self.max_blocks = min(num_blocks, math.ceil((cfg.max_position_embeddings + 1) / block_size))
        tables_on = torch.device("cpu") if device.type == "meta" else device
        self.block_tables = torch.zeros(num_slots + 1, self.max_blocks, dtype=torch.int32, device=tables_on)
        self._table_writes: list[tuple[int, int, int]] = []  # (slot, index, block) not yet on the device
        # A host copy of the tables, kept by a rank group's leader, which sends rows of them (`mirror_block_tables`).
        self.host_block_tables: torch.Tensor | None = None
        # A rank group's leader records its writes here for the followers (None: nobody mirrors this pool).
        self.journal: list[PoolWrite] | None = None
        f32 = torch.float32
        self.window: list[torch.Tensor] = []
        self.comp: list[dict[str, torch.Tensor]] = []
        self.entries: list[BlockStore | None] = []
        self.index_keys: list[BlockStore | None] = []
        ecodec, kcodec = entry_codec(cfg, dtype, low_precision), index_key_codec(cfg, dtype, low_precision)
        slots = num_slots + 1 + snapshot_slots
        for i in range(cfg.num_hidden_layers + mtp_layers):  # MTP layer j is layer num_hidden_layers + j
            m, csa = cfg.ratio(i), cfg.is_csa(i)
            self.window.append(torch.zeros(slots, cfg.sliding_window, cfg.head_dim, dtype=dtype, device=device))
            comp: dict[str, torch.Tensor] = {}
            if m:
                coff = 2 if csa else 1
                for name in ("comp_kv", "comp_score"):
                    comp[name] = torch.zeros(slots, coff * m, coff * cfg.head_dim, dtype=f32, device=device)
                if csa:
                    for name in ("icomp_kv", "icomp_score"):
                        comp[name] = torch.zeros(slots, 2 * m, 2 * cfg.index_head_dim, dtype=f32, device=device)
            self.comp.append(comp)
            self.entries.append(BlockStore(ecodec, num_blocks, block_size // m, device) if m else None)
            self.index_keys.append(BlockStore(kcodec, num_blocks, block_size // m, device) if csa else None)
        self.storage = [
            PagedLayerStorage(
                window=self.window[i],
                comp=self.comp[i],
                entries=e.paged(dtype) if (e := self.entries[i]) is not None else None,
                index_keys=k.paged(dtype) if (k := self.index_keys[i]) is not None else None,
                sink_slot=self.sink_slot,
            )
            for i in range(cfg.num_hidden_layers + mtp_layers)
        ]

    def record(self, *write: Any) -> None:
        """Note a write for the followers of a rank group (a no-op unless `journal` is set)."""
        if self.journal is not None:
            self.journal.append(write)

    def reset_slot(self, slot: int) -> None:
        """A fresh sequence's slot: empty window, compressor state kv = 0 and score = -inf."""
        self.record("reset_slot", slot)
        for i, comp in enumerate(self.comp):
            self.window[i][slot].zero_()
            for name, t in comp.items():
                t[slot].fill_(float("-inf") if name.endswith("score") else 0.0)

    def copy_slot(self, src: int, dst: int) -> None:
        """Slot `dst` becomes a copy of slot `src` (window rings and compressor states of every layer)."""
        self.record("copy_slot", src, dst)
        for i, comp in enumerate(self.comp):
            self.window[i][dst].copy_(self.window[i][src])
            for t in comp.values():
                t[dst].copy_(t[src])

    def copy_block(self, src: int, dst: int) -> None:
        """Block `dst` becomes a copy of block `src` (every layer's entries and indexer keys)."""
        self.record("copy_block", src, dst)
        for store in [*self.entries, *self.index_keys]:
            if store is not None:
                store.copy_block(src, dst)

    def assign_blocks(self, slot: int, first: int, blocks: list[int]) -> None:
        """Blocks `blocks` become entries first.. of the slot's block table (on the device at the next flush)."""
        self._table_writes += [(slot, first + i, b) for i, b in enumerate(blocks)]

    def flush_block_tables(self) -> None:
        """Copy the pending block-table entries to the device: one transfer and one indexed write, whatever they
        are (none included), so a decode step is the same ops whether sequences took blocks or not."""
        writes, self._table_writes = self._table_writes, []
        columns = torch.tensor([[w[k] for w in writes] for k in range(3)], dtype=torch.int64)  # [3, n], n >= 0
        slot, index, block = to_device(columns, self.block_tables.device)
        self.block_tables.index_put_((slot, index), block.to(torch.int32))
        host = self.host_block_tables
        if host is not None and host is not self.block_tables:
            host.index_put_((columns[0], columns[1]), columns[2].to(torch.int32))

    def mirror_block_tables(self) -> None:
        """Keep a host copy of the block tables from now on (the tables themselves when they live on the host)."""
        tables = self.block_tables
        self.host_block_tables = tables if tables.device.type == "cpu" else tables.cpu()

    @property
    def block_bytes(self) -> int:
        stores = [s for s in [*self.entries, *self.index_keys] if s is not None]
        return sum(s.block_bytes for s in stores)

    @property
    def slot_bytes(self) -> int:
        tensors = [*self.window, *(t for comp in self.comp for t in comp.values())]
        return sum(t[0].numel() * t.element_size() for t in tensors)


class PagedLayerState(LayerState):
    """One layer of a sequence, over its pool slot and block table (the `LayerState` interface).

    `n_entries` follows from the sequence's position (entries of complete blocks: position // m), plus the
    entries the per-sequence path appended during the call that has not advanced the position yet; so the batched
    decode step, which advances only `position`, keeps every layer consistent without touching it."""

    # The dataclass fields of LayerState become views of the pool, so its generated __init__ is not used.
    def __init__(self, pool: KVPool, layer: int, slot: int, table: list[int], seq: PagedSequenceState) -> None:
        self._pool, self._layer, self._slot, self._table = pool, layer, slot, table
        self._seq, self._ratio = seq, pool.cfg.ratio(layer)
        self._mtp = layer >= pool.cfg.num_hidden_layers
        self._extra, self._at = 0, -1  # entries appended at position `_at` beyond position // m

    def _position(self) -> int:
        return self._seq.mtp_position if self._mtp else self._seq.position

    @property
    def n_entries(self) -> int:
        if not self._ratio:
            return 0
        position = self._position()
        if self._at != position:
            self._extra, self._at = 0, position
        return position // self._ratio + self._extra

    @n_entries.setter
    def n_entries(self, value: int) -> None:
        position = self._position()
        self._extra, self._at = value - (position // self._ratio if self._ratio else 0), position

    def _comp(self, name: str) -> torch.Tensor:
        comp = self._pool.comp[self._layer]
        return comp[name][self._slot] if name in comp else torch.zeros(0, 0)

    def _set_comp(self, name: str, value: torch.Tensor) -> None:
        self._pool.comp[self._layer][name][self._slot].copy_(value)

    @property
    def window(self) -> torch.Tensor:
        return self._pool.window[self._layer][self._slot]

    @window.setter
    def window(self, value: torch.Tensor) -> None:
        self.window.copy_(value)

    @property
    def comp_kv(self) -> torch.Tensor:
        return self._comp("comp_kv")

    @comp_kv.setter
    def comp_kv(self, value: torch.Tensor) -> None:
        self._set_comp("comp_kv", value)

    @property
    def comp_score(self) -> torch.Tensor:
        return self._comp("comp_score")

    @comp_score.setter
    def comp_score(self, value: torch.Tensor) -> None:
        self._set_comp("comp_score", value)

    @property
    def icomp_kv(self) -> torch.Tensor:
        return self._comp("icomp_kv")

    @icomp_kv.setter
    def icomp_kv(self, value: torch.Tensor) -> None:
        self._set_comp("icomp_kv", value)

    @property
    def icomp_score(self) -> torch.Tensor:
        return self._comp("icomp_score")

    @icomp_score.setter
    def icomp_score(self, value: torch.Tensor) -> None:
        self._set_comp("icomp_score", value)

    @property
    def entries(self) -> torch.Tensor:
        return self.valid_entries()

    @entries.setter
    def entries(self, value: torch.Tensor) -> None:
        raise AttributeError("paged entries are written with append_entries")

    @property
    def index_keys(self) -> torch.Tensor:
        return self.valid_index_keys()

    @index_keys.setter
    def index_keys(self, value: torch.Tensor) -> None:
        raise AttributeError("paged indexer keys are written with append_entries")

    def valid_entries(self) -> torch.Tensor:
        store = self._pool.entries[self._layer]
        if store is None:
            return torch.zeros(0, self._pool.cfg.head_dim, dtype=self._pool.dtype, device=self.window.device)
        return store.read(self._table, self.n_entries)

    def valid_index_keys(self) -> torch.Tensor:
        store = self._pool.index_keys[self._layer]
        if store is None:
            return torch.zeros(0, 0, dtype=self._pool.dtype, device=self.window.device)
        return store.read(self._table, self.n_entries)

    def append_entries(self, entries: torch.Tensor, index_keys: torch.Tensor | None) -> None:
        """Store new compressed entries (and CSA indexer keys) in the sequence's blocks."""
        store = self._pool.entries[self._layer]
        if store is None or entries.shape[0] == 0:
            return
        first = self.n_entries
        need = math.ceil((first + entries.shape[0]) / store.rows_per_block)
        if need > len(self._table):
            raise RuntimeError(f"KV pool: entries past the sequence's {len(self._table)} reserved blocks")
        store.write(self._table, first, entries)
        keys = self._pool.index_keys[self._layer]
        if keys is not None and index_keys is not None:
            keys.write(self._table, first, index_keys)
        self.n_entries = first + entries.shape[0]


class PagedSequenceState(SequenceState):
    """A sequence's state in the pool: its slot and its block table (ids of the blocks it holds, in order)."""

    def __init__(self, pool: KVPool, slot: int) -> None:
        self.pool, self.slot = pool, slot
        self.table: list[int] = []
        self.position = 0
        self.mtp_position = 0
        n = pool.cfg.num_hidden_layers
        self.layers = [PagedLayerState(pool, i, slot, self.table, self) for i in range(n)]
        self.mtp_layers = [PagedLayerState(pool, n + j, slot, self.table, self) for j in range(pool.mtp_layers)]


class KVCacheManager:
    """Hands out the pool's blocks and slots to sequences; the scheduler asks it before every chunk.

    With a prefix cache (`prefix_seed`, `prefix_slots` snapshot slots; `prefix_cache.py`), blocks are reference
    counted: a block is held by the sequences whose tables list it and by the cache entries covering it, and is free
    when neither holds it. Blocks only entries hold count as available: taking them evicts entries, least valuable
    first, before the scheduler has to preempt anyone; a block a sequence holds is never reclaimed.
    """

    def __init__(
        self,
        model: DeepseekV4,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        prefix_slots: int = 0,
        prefix_seed: bytes | None = None,
        device: torch.device | None = None,
    ) -> None:
        cfg = model.cfg
        ratios = sorted({r for r in cfg.compress_ratios[: cfg.num_hidden_layers] if r})
        if num_blocks < 1 or num_slots < 1 or block_size < 1 or any(block_size % r for r in ratios):
            raise ValueError(
                f"KV pool: need num_blocks, num_slots >= 1 and block_size a multiple of every compression ratio "
                f"{ratios}, got num_blocks={num_blocks}, num_slots={num_slots}, block_size={block_size}"
            )
        if prefix_slots < 0:
            raise ValueError(f"KV pool: prefix_slots must be >= 0, got {prefix_slots}")
        self.model = model
        self.total_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        cache_on = prefix_seed is not None and prefix_slots > 0
        self.pool = KVPool(
            cfg,
            num_blocks,
            block_size,
            num_slots,
            device or model.device,
            model.dtype,
            low_precision=model.qat_simulation,
            mtp_layers=len(model.mtp),
            snapshot_slots=prefix_slots if cache_on else 0,
        )
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._seq_refs = [0] * num_blocks
        self._cache_refs = [0] * num_blocks
        self._cache_only = 0  # blocks held by cache entries and no sequence
        self._cached = 0  # blocks held by at least one cache entry
        self.cache = (
            PrefixCache(block_size, prefix_seed, self.pool.snapshot_slot_ids)
            if cache_on and prefix_seed is not None
            else None
        )

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds (blocks only the prefix cache holds are reclaimable, hence not counted)."""
        return self.total_blocks - len(self._free_blocks) - self._cache_only

    @property
    def cached_blocks(self) -> int:
        """Blocks some prefix-cache entry holds (shared with running sequences or not)."""
        return self._cached

    @property
    def bytes_per_token(self) -> float:
        """Pool bytes per token position (blocks only; `slot_bytes` is the per-sequence constant)."""
        return self.pool.block_bytes / self.block_size

    @property
    def cache_bytes(self) -> int:
        """Device bytes the prefix cache holds: its blocks and its snapshot slots in use."""
        if self.cache is None:
            return 0
        return self._cached * self.pool.block_bytes + len(self.cache) * self.pool.slot_bytes

    def blocks_for(self, num_tokens: int) -> int:
        return max(1, math.ceil(num_tokens / self.block_size))

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` positions fits an otherwise empty pool."""
        return self.blocks_for(num_tokens) <= self.total_blocks

    def _held(self, seq: Request) -> int:
        return len(seq.state.table) if isinstance(seq.state, PagedSequenceState) else 0

    def _available(self) -> int:
        return len(self._free_blocks) + self._cache_only

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence could take now: free ones and those only cache entries hold."""
        return self._available()

    def _ref(self, block: int, seq: int = 0, cache: int = 0) -> None:
        """Change a block's holders; it goes back to the free list when nobody holds it any more."""
        old_seq, old_cache = self._seq_refs[block], self._cache_refs[block]
        new_seq, new_cache = old_seq + seq, old_cache + cache
        self._seq_refs[block], self._cache_refs[block] = new_seq, new_cache
        self._cache_only += (new_seq == 0 and new_cache > 0) - (old_seq == 0 and old_cache > 0)
        self._cached += (new_cache > 0) - (old_cache > 0)
        if new_seq == new_cache == 0:
            self._free_blocks.append(block)

    def _take_block(self) -> int:
        """A free block for a sequence, evicting cache entries when none is free (callers checked `_available`)."""
        while not self._free_blocks:
            if not self.evict():
                raise RuntimeError("KV pool: no free block and no cache entry to evict")
        block = self._free_blocks.pop()
        self._ref(block, seq=1)
        return block

    def evict(self) -> bool:
        """Evict the prefix cache's next victim (its blocks go free unless a sequence or another entry holds them);
        False when there is nothing to evict."""
        victim = self.cache.victim() if self.cache is not None else None
        if victim is None:
            return False
        assert self.cache is not None
        for b in victim.blocks:
            self._ref(b, cache=-1)
        self.cache.remove(victim)
        return True

    def shares_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing `a` can make room for `b` (always, with one pool)."""
        return True

    def can_grow(self, seq: Request, n_new: int) -> bool:
        if seq.state is None and not self._free_slots:
            return False
        return self.blocks_for(seq.num_computed + n_new) - self._held(seq) <= self._available()

    def grow(self, seq: Request, n_new: int) -> None:
        """Reserve room for `n_new` more positions; the first call takes a slot and restores an imported state."""
        if not self.can_grow(seq, n_new):
            raise RuntimeError(f"KV pool: no room for {n_new} more tokens of {seq.request_id}")
        if seq.state is None:
            slot = self._free_slots.pop()
            self.pool.reset_slot(slot)
            seq.state = PagedSequenceState(self.pool, slot)
        state = seq.state
        assert isinstance(state, PagedSequenceState)
        first = len(state.table)
        while len(state.table) < self.blocks_for(seq.num_computed + n_new):
            state.table.append(self._take_block())
        if len(state.table) > first:
            self.pool.assign_blocks(state.slot, first, state.table[first:])
        if seq.snapshot is not None:
            self.restore(seq.snapshot, state)
            seq.snapshot = None

    def restore(self, snapshot: KVSnapshot, state: PagedSequenceState) -> None:
        """Fill a fresh state (its slot reset, its blocks taken) with an imported snapshot."""
        # imported here: the KV blob format needs crc32c, which the engine itself does not (bench/gpu.sh)
        from dsv4.model_runtime.engine import kv_export

        kv_export.restore(self.model, snapshot, state)
        self.pool.record("restore", snapshot, state.slot, tuple(state.table))

    def admit(self, seq: Request, entry: CacheEntry | None, n_new: int) -> bool:
        """Give a waiting sequence its state and room for `n_new` positions: resumed from a prefix-cache entry
        (its full blocks shared, a partly filled last block copied, its slot copied) or fresh (or its imported
        state). False, with nothing taken, when the pool has no room."""
        if entry is None:
            if not self.can_grow(seq, n_new):
                return False
            self.grow(seq, n_new)
            return True
        if not self._free_slots:
            return False
        b = self.block_size
        shared = entry.position // b
        state = PagedSequenceState(self.pool, self._free_slots.pop())
        seq.state = state
        for block in entry.blocks[:shared]:
            self._ref(block, seq=1)
            state.table.append(block)
        partial = entry.position % b != 0
        if self.blocks_for(entry.position + n_new) - shared > self._available():
            self.free(seq)
            return False
        if partial:  # copy on write: the sequence writes the rows of this block past the entry's position
            source = entry.blocks[shared]
            self._ref(source, seq=1)  # kept while it is copied, whatever the evictions for the copy's block do
            block = self._take_block()
            self.pool.copy_block(source, block)
            self._ref(source, seq=-1)
            state.table.append(block)
        self.pool.copy_slot(entry.slot, state.slot)
        state.position = seq.num_computed = entry.position
        self.pool.assign_blocks(state.slot, 0, list(state.table))
        assert self.cache is not None
        self.cache.use(entry)
        # the MTP goes on from the entry when the entry holds its state; else the sequence decodes without drafts
        seq.use_mtp = seq.use_mtp and entry.mtp
        if seq.use_mtp:
            state.mtp_position = entry.position
        self.grow(seq, n_new)
        return True

    def _snapshot_slot(self) -> int | None:
        """A free snapshot slot, evicting entries until one is; None when none can be had."""
        assert self.cache is not None
        slot = self.cache.take_slot()
        while slot is None and self.evict():
            slot = self.cache.take_slot()
        return slot

    def snapshot(self, seq: Request, prompt: Prompt, position: int) -> CacheEntry | None:
        """Make a cache entry of the sequence's state, which stands at `position` (a chunk just ended there), from
        the first `position` tokens of `prompt`; None when it is cached already or no snapshot slot can be had."""
        cache, state = self.cache, seq.state
        assert cache is not None and isinstance(state, PagedSequenceState) and state.position == position
        if cache.get(prompt, position) is not None:
            return None
        slot = self._snapshot_slot()
        if slot is None:
            return None
        blocks = tuple(state.table[: math.ceil(position / self.block_size)])
        for block in blocks:
            self._ref(block, cache=1)
        self.pool.copy_slot(state.slot, slot)
        tokens = array("l", prompt.tokens[:position])
        hashes = tuple(prompt.hashes[: position // self.block_size])
        entry = CacheEntry(position, tokens, hashes, blocks, slot, mtp=seq.use_mtp and state.mtp_position == position)
        cache.insert(entry)
        return entry

    def import_entry(self, prompt: Prompt, snapshot: KVSnapshot) -> CacheEntry | None:
        """Make a cache entry of an imported state (`kv_export.load` verified it) of all of `prompt`'s tokens;
        None when it is cached already or the pool has no room for it."""
        cache, position = self.cache, len(prompt)
        assert cache is not None
        if cache.get(prompt, position) is not None:
            return None
        need = self.blocks_for(position)
        if need > self._available():
            return None
        slot = self._snapshot_slot()
        if slot is None:
            return None
        blocks: list[int] = []
        while len(blocks) < need:  # enough are free or held by other entries only (checked above)
            while not self._free_blocks:
                if not self.evict():
                    raise RuntimeError("KV pool: no free block and no cache entry to evict")
            blocks.append(self._free_blocks.pop())
            self._ref(blocks[-1], cache=1)
        state = PagedSequenceState(self.pool, slot)
        state.table.extend(blocks)
        self.pool.reset_slot(slot)
        try:
            self.restore(snapshot, state)
        except Exception:
            for block in blocks:
                self._ref(block, cache=-1)
            cache.release_slot(slot)
            raise
        tokens = array("l", prompt.tokens)
        hashes = tuple(prompt.hashes[: position // self.block_size])
        entry = CacheEntry(position, tokens, hashes, tuple(blocks), slot, mtp=snapshot.mtp_layers > 0)
        cache.insert(entry, imported=True)
        return entry

    def entry_state(self, entry: CacheEntry) -> PagedSequenceState:
        """A read-only view of an entry's state (for its export): its snapshot slot, its blocks, its position."""
        state = PagedSequenceState(self.pool, entry.slot)
        state.table.extend(entry.blocks)
        state.position = entry.position
        if entry.mtp:
            state.mtp_position = entry.position
        return state

    def free(self, seq: Request) -> None:
        """Give the sequence's blocks and slot back (idempotent); an imported state not yet restored is dropped."""
        state = seq.state
        if isinstance(state, PagedSequenceState):
            for block in reversed(state.table):
                self._ref(block, seq=-1)
            self._free_slots.append(state.slot)
            state.table.clear()
        seq.state = None
        seq.snapshot = None
