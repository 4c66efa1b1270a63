"""The KV pools of a rank group with data-parallel attention, as its leader schedules them.

Under data-parallel attention each data-parallel group holds the KV state of its own sequences only (that is the
point: the groups' pools add up). The leader's scheduler still decides for all of them, so it keeps one
`KVCacheManager` per group: its own group's, over its real pool, and, for every other group, one of the same size
over a pool on the meta device (no storage; block tables on the host), whose writes (slot resets, the prefix
cache's slot and block copies, restored imports) the leader's runner sends to that group's ranks with the next call.

`GroupKV` gives the scheduler and the engine the interface of one manager over all of them:

* a sequence stays in the group that admitted it; a new one resumes in the group holding its longest cached
  prefix, else goes to the group with the most free blocks among those with a free slot and room for it;
* each group has its own prefix cache (its entries point at its blocks and snapshot slots); `GroupPrefixCache` looks
  a prompt up in all of them, and its KV events say what the worker holds: a prefix is stored when the first group
  caches it and evicted when the last one drops it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from dsv4.model_runtime.engine.kv_state import KVCacheManager, KVPool, PagedSequenceState
from dsv4.model_runtime.engine.port import PrefixEvent
from dsv4.model_runtime.engine.prefix_cache import CacheEntry, PrefixCache, PrefixStats, Prompt
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
    """Another data-parallel group's blocks, slots and prefix cache, as the leader hands them out: a restored import
    is only recorded (that group's ranks restore it) and moves the state's position, as a restore does."""

    def __init__(
        self,
        model: DeepseekV4,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        prefix_slots: int = 0,
        prefix_seed: bytes | None = None,
    ) -> None:
        super().__init__(model, num_blocks, block_size, num_slots, prefix_slots, prefix_seed, torch.device("meta"))

    def restore(self, snapshot: KVSnapshot, state: PagedSequenceState) -> None:
        if state.position != 0:
            raise ValueError("restore: the target state is not fresh")
        self.pool.record("restore", snapshot, state.slot, tuple(state.table))
        state.position = snapshot.position


class GroupPrefixCache:
    """The prefix caches of every data-parallel group as one (the part of `PrefixCache` the scheduler and the
    engine use); the groups' counters are one `PrefixStats`."""

    def __init__(self, caches: list[PrefixCache], free_blocks: Callable[[int], int]) -> None:
        self.caches = caches
        self.block_size = caches[0].block_size
        self._free = free_blocks  # group -> its free blocks now
        self._held: Counter[str] = Counter()  # aligned prefix -> groups holding it
        self.stats = PrefixStats()

    @property
    def stats(self) -> PrefixStats:
        return self._stats

    @stats.setter
    def stats(self, value: PrefixStats) -> None:
        self._stats = value
        for cache in self.caches:
            cache.stats = value

    def __len__(self) -> int:
        return sum(len(c) for c in self.caches)

    def group_of(self, entry: CacheEntry) -> int:
        """The group whose cache holds `entry`."""
        for g, cache in enumerate(self.caches):
            if cache.holds(entry):
                return g
        raise ValueError("a prefix-cache entry held by no group")

    def entries(self) -> list[CacheEntry]:
        return [e for c in self.caches for e in c.entries()]

    def prompt(self, tokens: Sequence[int]) -> Prompt:
        return self.caches[0].prompt(tokens)

    def lookup(self, prompt: Prompt, limit: int) -> CacheEntry | None:
        """The longest entry of any group (of equal ones, the group's with the most free blocks)."""
        found = [(e, g) for g, c in enumerate(self.caches) if (e := c.lookup(prompt, limit)) is not None]
        if not found:
            return None
        return max(found, key=lambda eg: (eg[0].position, self._free(eg[1]), -eg[1]))[0]

    def get(self, prompt: Prompt, position: int) -> CacheEntry | None:
        e = self.lookup(prompt, position)
        return e if e is not None and e.position == position else None

    def by_chain_hash(self, chain_hash: str) -> CacheEntry | None:
        for cache in self.caches:
            if (e := cache.by_chain_hash(chain_hash)) is not None:
                return e
        return None

    def chain_hashes(self) -> list[str]:
        return list(dict.fromkeys(h for c in self.caches for h in c.chain_hashes()))

    def drain_events(self) -> list[PrefixEvent]:
        """The worker's events since the last call: a prefix's first holder stores it, its last one evicts it."""
        out: list[PrefixEvent] = []
        for cache in self.caches:
            for event in cache.drain_events():
                held = self._held[event.chain_hash]
                if event.op == "stored":
                    self._held[event.chain_hash] = held + 1
                    if held == 0:
                        out.append(event)
                else:
                    self._held[event.chain_hash] = held - 1
                    if held == 1:
                        del self._held[event.chain_hash]
                        out.append(event)
        return out


class GroupKV:
    """The leader's KV manager of `groups` data-parallel groups (the interface of `KVCacheManager`): `groups[0]` over
    the leader's pool, a `RemoteGroupKV` for each other group. `total_blocks` and `used_blocks` count every group;
    a sequence must fit one group's pool."""

    def __init__(
        self,
        model: DeepseekV4,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        groups: int,
        prefix_slots: int = 0,
        prefix_seed: bytes | None = None,
    ) -> None:
        if groups < 2:
            raise ValueError(f"GroupKV is for 2 or more data-parallel groups, got {groups}")
        own = KVCacheManager(model, num_blocks, block_size, num_slots, prefix_slots, prefix_seed)
        others = [
            RemoteGroupKV(model, num_blocks, block_size, num_slots, prefix_slots, prefix_seed)
            for _ in range(groups - 1)
        ]
        self.groups: list[KVCacheManager] = [own, *others]
        self.pools: list[KVPool] = [g.pool for g in self.groups]
        self.pool = own.pool
        self.block_size, self.num_slots = block_size, num_slots
        self.group_blocks = num_blocks
        self.total_blocks = num_blocks * groups
        caches = [g.cache for g in self.groups if g.cache is not None]
        self.cache = GroupPrefixCache(caches, self._free) if len(caches) == groups else None

    def group_of(self, seq: Request) -> int:
        """The data-parallel group holding the sequence's state (-1: it holds none)."""
        return pool_index(self.pools, seq.state)

    def _free(self, g: int) -> int:
        return self.groups[g].free_blocks

    @property
    def used_blocks(self) -> int:
        return sum(g.used_blocks for g in self.groups)

    @property
    def cached_blocks(self) -> int:
        return sum(g.cached_blocks for g in self.groups)

    @property
    def cache_bytes(self) -> int:
        return sum(g.cache_bytes for g in self.groups)

    @property
    def bytes_per_token(self) -> float:
        return self.groups[0].bytes_per_token

    def blocks_for(self, num_tokens: int) -> int:
        return self.groups[0].blocks_for(num_tokens)

    def fits_alone(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.group_blocks

    def shares_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing `a` can make room for `b`: both in one group, or either in none yet."""
        ga, gb = self.group_of(a), self.group_of(b)
        return ga == gb or ga < 0 or gb < 0

    def _new_group(self, seq: Request, n_new: int) -> int:
        """The group for a sequence without a state: the most free blocks among those with room (-1: none)."""
        fits = [g for g, m in enumerate(self.groups) if m.can_grow(seq, n_new)]
        return max(fits, key=lambda g: (self._free(g), -g)) if fits else -1

    def can_grow(self, seq: Request, n_new: int) -> bool:
        g = self.group_of(seq)
        if g >= 0:
            return self.groups[g].can_grow(seq, n_new)
        return any(m.can_grow(seq, n_new) for m in self.groups)

    def grow(self, seq: Request, n_new: int) -> None:
        g = self.group_of(seq)
        if g < 0:
            g = self._new_group(seq, n_new)
            if g < 0:
                raise RuntimeError(f"KV pool: no group has room for {n_new} more tokens of {seq.request_id}")
        self.groups[g].grow(seq, n_new)

    def admit(self, seq: Request, entry: CacheEntry | None, n_new: int) -> bool:
        """A waiting sequence's state: in the group holding `entry`, else in the group `grow` picks."""
        if entry is not None:
            assert self.cache is not None
            return self.groups[self.cache.group_of(entry)].admit(seq, entry, n_new)
        if not self.can_grow(seq, n_new):
            return False
        self.grow(seq, n_new)
        return True

    def snapshot(self, seq: Request, prompt: Prompt, position: int) -> CacheEntry | None:
        return self.groups[self.group_of(seq)].snapshot(seq, prompt, position)

    def import_entry(self, prompt: Prompt, snapshot: KVSnapshot) -> CacheEntry | None:
        """An imported prefix goes to the group with the most free blocks (None: some group caches it already, or
        that group has no room)."""
        if self.cache is None or self.cache.get(prompt, len(prompt)) is not None:
            return None
        g = max(range(len(self.groups)), key=lambda g: (self._free(g), -g))
        return self.groups[g].import_entry(prompt, snapshot)

    def entry_state(self, entry: CacheEntry) -> PagedSequenceState:
        assert self.cache is not None
        return self.groups[self.cache.group_of(entry)].entry_state(entry)

    def evict(self) -> bool:
        """Evict one entry from the first group that has any; False when no group has one."""
        return any(m.evict() for m in self.groups)

    def free(self, seq: Request) -> None:
        self.groups[max(self.group_of(seq), 0)].free(seq)  # a sequence without a state has nothing to give back
