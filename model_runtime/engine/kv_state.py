"""The KV pool of the engine: which sequence holds which blocks, and the per-sequence V4 state they back.

A block covers `block_size` token positions of one sequence: the compressed entries (and CSA indexer keys) of
those positions in every compressed layer. The sliding-window ring and the compressors' partial-block state
are a constant per running sequence (one slot each). A sequence at n tokens holds ceil(n / block_size) blocks.
"""

from __future__ import annotations

import math

from dsv4.model_runtime.engine.sequence import Sequence
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import SequenceState


class KVCacheManager:
    """Block accounting over a fixed pool shared by all sequences of the engine."""

    def __init__(self, model: DeepseekV4, num_blocks: int, block_size: int) -> None:
        ratios = [r for r in model.cfg.compress_ratios[: model.cfg.num_hidden_layers] if r]
        if num_blocks < 1 or block_size < 1 or any(block_size % r for r in ratios):
            raise ValueError(
                "KV pool: need num_blocks >= 1 and block_size a multiple of every compression ratio "
                f"{sorted(set(ratios))}, got num_blocks={num_blocks}, block_size={block_size}"
            )
        self.model = model
        self.total_blocks, self.block_size = num_blocks, block_size
        self._held: dict[str, int] = {}

    @property
    def used_blocks(self) -> int:
        return sum(self._held.values())

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return max(1, math.ceil(num_tokens / self.block_size))

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` positions fits an otherwise empty pool."""
        return self.blocks_for(num_tokens) <= self.total_blocks

    def can_grow(self, seq: Sequence, n_new: int) -> bool:
        need = self.blocks_for(seq.num_computed + n_new) - self._held.get(seq.request_id, 0)
        return need <= self.free_blocks

    def grow(self, seq: Sequence, n_new: int) -> None:
        """Reserve capacity for `n_new` more positions of `seq` (creating its state at the first call)."""
        if not self.can_grow(seq, n_new):
            raise RuntimeError(f"KV pool: no room for {n_new} more tokens of {seq.request_id}")
        if seq.state is None:
            seq.state = self.model.new_state()
        self._held[seq.request_id] = self.blocks_for(seq.num_computed + n_new)

    @property
    def bytes_per_token(self) -> float:
        """Bytes of one token position in the pool's block storage (compressed entries and indexer keys)."""
        cfg, esize = self.model.cfg, self.model.embed.weight.element_size()
        total = 0.0
        for i in range(cfg.num_hidden_layers):
            m = cfg.ratio(i)
            if m:
                total += cfg.head_dim * esize / m + (cfg.index_head_dim * esize / m if cfg.is_csa(i) else 0)
        return total

    def new_state(self) -> SequenceState:
        """An empty state for a sequence (to restore an imported snapshot into)."""
        return self.model.new_state()

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks and state (idempotent)."""
        self._held.pop(seq.request_id, None)
        seq.state = None
