"""The KV pools of a rank group with data-parallel attention, as its leader schedules them.

Under data-parallel attention each data-parallel group holds the KV state of its own sequences only (that is the
point: the groups' pools add up). The leader's scheduler still decides for all of them, so it keeps one manager
per group: its own group's, over its real pool, and, for every other group, a manager of the same size over a
pool on the meta device (no storage; block tables on the host), whose writes (slot resets, restored imports) the
leader's runner sends to that group's ranks with the next call.

A sequence stays in the group that admitted it; a new one goes to the group with the most free blocks among those
with a free slot and room for it. The prefix cache is off under data-parallel attention (its entries would have to
be looked up per group), so every method here runs without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from dsv4.model_runtime.engine.kv_state import KVCacheManager, KVPool, PagedSequenceState
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import SequenceState

if TYPE_CHECKING:  # the KV blob format needs crc32c, which the bare GPU machine of bench/gpu.sh lacks
    from dsv4.model_runtime.engine.kv_export import KVSnapshot


def pool_index(pools: Sequence[KVPool], state: SequenceState | None) -> int:
    """The index of the pool in `pools` that holds `state` (-1: no paged state)."""
    if not isinstance(state, PagedSequenceState):
        return -1
    for g, pool in enumerate(pools):
        if state.pool is pool:
            return g
    raise ValueError("a sequence's state is in none of the data-parallel groups' pools")


class RemoteGroupKV(KVCacheManager):
    """Another data-parallel group's blocks and slots, as the leader hands them out: a restored import is only
    recorded (that group's ranks restore it) and moves the state's position, as a restore does."""

    def __init__(self, model: DeepseekV4, num_blocks: int, block_size: int, num_slots: int) -> None:
        super().__init__(model, num_blocks, block_size, num_slots, device=torch.device("meta"))

    def restore(self, snapshot: KVSnapshot, state: PagedSequenceState) -> None:
        if state.position != 0:
            raise ValueError("restore: the target state is not fresh")
        self.pool.record("restore", snapshot, state.slot, tuple(state.table))
        state.position = snapshot.position


class GroupKV(KVCacheManager):
    """The leader's KV manager of `groups` data-parallel groups: itself for group 0 (the leader's pool), a
    `RemoteGroupKV` for each other group. `total_blocks` and `used_blocks` count every group; a sequence must fit
    one group's pool."""

    def __init__(self, model: DeepseekV4, num_blocks: int, block_size: int, num_slots: int, groups: int) -> None:
        if groups < 2:
            raise ValueError(f"GroupKV is for 2 or more data-parallel groups, got {groups}")
        super().__init__(model, num_blocks, block_size, num_slots)
        self.group_blocks = num_blocks
        self.total_blocks = num_blocks * groups
        self.others = [RemoteGroupKV(model, num_blocks, block_size, num_slots) for _ in range(groups - 1)]
        self.pools: list[KVPool] = [self.pool, *(o.pool for o in self.others)]

    def group_of(self, seq: Request) -> int:
        """The data-parallel group holding the sequence's state (-1: it holds none)."""
        return pool_index(self.pools, seq.state)

    def _can_grow(self, g: int, seq: Request, n_new: int) -> bool:
        return KVCacheManager.can_grow(self, seq, n_new) if g == 0 else self.others[g - 1].can_grow(seq, n_new)

    def _free_in(self, g: int) -> int:
        return KVCacheManager._available(self) if g == 0 else self.others[g - 1]._available()

    @property
    def used_blocks(self) -> int:
        return self.group_blocks - self._available() + sum(o.used_blocks for o in self.others)

    def shares_pool(self, a: Request, b: Request) -> bool:
        ga, gb = self.group_of(a), self.group_of(b)
        return ga == gb or ga < 0 or gb < 0

    def fits_alone(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.group_blocks

    def can_grow(self, seq: Request, n_new: int) -> bool:
        g = self.group_of(seq)
        if g >= 0:
            return self._can_grow(g, seq, n_new)
        return any(self._can_grow(g, seq, n_new) for g in range(len(self.pools)))

    def grow(self, seq: Request, n_new: int) -> None:
        g = self.group_of(seq)
        if g < 0:
            fits = [g for g in range(len(self.pools)) if self._can_grow(g, seq, n_new)]
            if not fits:
                raise RuntimeError(f"KV pool: no group has room for {n_new} more tokens of {seq.request_id}")
            g = max(fits, key=lambda g: (self._free_in(g), -g))
        if g == 0:
            KVCacheManager.grow(self, seq, n_new)
        else:
            self.others[g - 1].grow(seq, n_new)

    def free(self, seq: Request) -> None:
        g = self.group_of(seq)
        if g > 0:
            self.others[g - 1].free(seq)
        else:
            KVCacheManager.free(self, seq)
