"""The engine's prefix cache: which prompt prefixes it can resume from, and where their state is kept.

What is shared and what is not (docs/engine.md, "Prefix caching"): below a position L the compressed entries and
CSA indexer keys never change once written, so the KV blocks covering [0, L) are shared read-only between every
sequence whose tokens start with the same L tokens (reference-counted by `KVCacheManager`). The rest of the state
at L (the sliding-window ring and the compressors' partial blocks: a pool slot) is private; a cache entry keeps a
copy of it in one of the pool's snapshot slots. An entry is therefore (L, the first L tokens, the blocks of [0, L),
a snapshot slot). A sequence admitted on an entry gets a fresh slot copied from the snapshot, the entry's full
blocks by reference and a private copy of a partly filled last block (copy on write), and starts its prefill at L.

Keys are vLLM's chained block hashes (`prefix_hash`, seeded with the model fingerprint and the block size): an entry
at L sits under the hash of its last full block (the seed when L < block size) and compares its tail tokens (at most
block size - 1) directly. Aligned entries (L a multiple of the block size) are the ones other processes can name: the
engine reports them as stored / evicted events and the workers publish them (KV events, the Redis tier).

Where entries are taken (the scheduler ends prefill chunks there; `snapshot_points`): at the end of every prompt (a
next chat turn extends it), at branch points (the end of the prefix the prompt shares with a waiting or running
request or with a cached entry, the prefixes that other requests demonstrably reuse, as Marconi does for hybrid
models), and at the block boundary below each of those (publishable). A snapshot is a whole slot (17.8 MB for Flash,
mostly the HCA compressors' fp32 partials, which an unaligned entry needs), so the cache takes a few well-chosen
snapshots per prompt rather than one per block (a 100k-token prompt has 390 block boundaries).

Eviction is segmented LRU over entries: entries never hit are evicted before entries that were (a burst of one-off
prompt ends does not push out a shared system prompt). Evicting an entry drops its references only: a block a running
sequence holds is never freed under it.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dsv4.model_runtime.engine.port import PrefixEvent
from dsv4.model_runtime.engine.prefix_hash import chain_hashes

MAX_BRANCH_POINTS = 2  # branch points a prompt snapshots (the most shared first), besides its end
PROTECTED_SHARE = 0.75  # at most this share of the snapshot slots holds entries that were hit (segmented LRU)


@dataclass(eq=False)
class CacheEntry:
    """The state after the first `position` tokens: the blocks of [0, position) and the pool slot holding the copy
    of the window ring and compressor state."""

    position: int
    tokens: array[int]  # the first `position` token ids
    hashes: tuple[str, ...]  # chain hashes of its full blocks (position // block_size)
    blocks: tuple[int, ...]  # pool blocks of positions [0, position): ceil(position / block_size)
    slot: int
    hits: int = 0
    chain_hash: str | None = None  # for an aligned entry, the hash of its last block: what other processes know
    mtp: bool = False  # its slot holds the MTP layers' state at `position` too (the sequence's MTP had caught up)


@dataclass
class PrefixStats:
    """Counters since the engine started (`LLMEngine.stats_extra`)."""

    queries: int = 0  # admissions that looked a prompt up
    hits: int = 0  # ... and resumed from an entry
    query_tokens: int = 0  # tokens of the prompts looked up
    hit_tokens: int = 0  # ... and not computed thanks to an entry
    stored: int = 0
    evictions: int = 0
    imported: int = 0


@dataclass
class Prompt:
    """A sequence's tokens up to the position its state must reach before it samples, and their chain hashes."""

    tokens: Sequence[int]
    hashes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix(a: Prompt, b: Prompt, block_size: int) -> int:
    """Length of the longest common prefix of two prompts (blocks by their chained hashes, then token by token)."""
    # Chained hashes: equal at block k means equal at every block before it, so the first differing block is found
    # by bisection.
    lo, hi = 0, min(len(a.hashes), len(b.hashes))
    while lo < hi:
        mid = (lo + hi) // 2
        if a.hashes[mid] == b.hashes[mid]:
            lo = mid + 1
        else:
            hi = mid
    i, end = lo * block_size, min(len(a), len(b))
    while i < end and a.tokens[i] == b.tokens[i]:
        i += 1
    return i


class PrefixCache:
    """The entries of one engine and the snapshot slots they use (bookkeeping only: `KVCacheManager` moves data)."""

    def __init__(self, block_size: int, seed: bytes, slots: Iterable[int]) -> None:
        self.block_size, self.seed = block_size, seed
        self._root = seed.hex()
        self._free_slots = list(slots)[::-1]
        self.capacity = len(self._free_slots)
        self._by_key: dict[str, list[CacheEntry]] = {}
        self._by_chain: dict[str, CacheEntry] = {}
        # Segmented LRU, least recently used first: entries never hit, and entries hit at least once.
        self._probation: OrderedDict[CacheEntry, None] = OrderedDict()
        self._protected: OrderedDict[CacheEntry, None] = OrderedDict()
        self._events: list[PrefixEvent] = []
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def entries(self) -> list[CacheEntry]:
        return [*self._probation, *self._protected]

    def holds(self, entry: CacheEntry) -> bool:
        """Whether `entry` is one of this cache's."""
        return entry in self._probation or entry in self._protected

    def prompt(self, tokens: Sequence[int]) -> Prompt:
        """`tokens` with the chain hashes of their full blocks."""
        return Prompt(tokens, chain_hashes(self.seed, tokens, self.block_size))

    def _key(self, hashes: Sequence[str], position: int) -> str:
        k = position // self.block_size
        return hashes[k - 1] if k else self._root

    def lookup(self, prompt: Prompt, limit: int) -> CacheEntry | None:
        """The longest entry whose tokens are a prefix of the prompt's first `limit` tokens."""
        b = self.block_size
        for k in range(min(limit // b, len(prompt.hashes)), -1, -1):
            best: CacheEntry | None = None
            for e in self._by_key.get(prompt.hashes[k - 1] if k else self._root, ()):
                longer = best is None or e.position > best.position
                if (
                    e.position <= limit
                    and longer
                    and e.tokens[k * b : e.position].tolist() == list(prompt.tokens[k * b : e.position])
                ):
                    best = e
            if best is not None:
                return best
        return None

    def get(self, prompt: Prompt, position: int) -> CacheEntry | None:
        """The entry of exactly the prompt's first `position` tokens."""
        e = self.lookup(prompt, position)
        return e if e is not None and e.position == position else None

    def by_chain_hash(self, chain_hash: str) -> CacheEntry | None:
        return self._by_chain.get(chain_hash)

    def chain_hashes(self) -> list[str]:
        """The aligned prefixes held (what a KV-event snapshot lists)."""
        return list(self._by_chain)

    def take_slot(self) -> int | None:
        """A free snapshot slot, None when all are in use (evict first)."""
        return self._free_slots.pop() if self._free_slots else None

    def release_slot(self, slot: int) -> None:
        """Give back a slot taken for an entry that was not made."""
        self._free_slots.append(slot)

    def insert(self, entry: CacheEntry, imported: bool = False) -> None:
        """Register an entry whose blocks and slot the caller has set up."""
        self._by_key.setdefault(self._key(entry.hashes, entry.position), []).append(entry)
        self._probation[entry] = None
        aligned = entry.hashes and len(entry.hashes) * self.block_size == entry.position
        entry.chain_hash = h = entry.hashes[-1] if aligned else None
        if h is not None:
            self._by_chain[h] = entry
            self._events.append(PrefixEvent("stored", h))
        self.stats.stored += 1
        self.stats.imported += imported

    def use(self, entry: CacheEntry) -> None:
        """A sequence resumed from `entry`: it moves to the most recently used end of the protected segment."""
        entry.hits += 1
        self._probation.pop(entry, None)
        self._protected.pop(entry, None)
        self._protected[entry] = None
        cap = max(1, int(self.capacity * PROTECTED_SHARE))
        while len(self._protected) > cap:  # the protected segment's LRU entry gets one more chance in probation
            demoted, _ = self._protected.popitem(last=False)
            self._probation[demoted] = None
            self._probation.move_to_end(demoted, last=False)

    def victim(self) -> CacheEntry | None:
        """The entry to evict next: the least recently used never-hit one, else the least recently used one."""
        for segment in (self._probation, self._protected):
            if segment:
                return next(iter(segment))
        return None

    def remove(self, entry: CacheEntry) -> None:
        """Forget an evicted entry (the caller drops its block references); its slot becomes free."""
        self._probation.pop(entry, None)
        self._protected.pop(entry, None)
        key = self._key(entry.hashes, entry.position)
        bucket = self._by_key[key]
        bucket.remove(entry)
        if not bucket:
            del self._by_key[key]
        h = entry.chain_hash
        if h is not None and self._by_chain.get(h) is entry:
            del self._by_chain[h]
            self._events.append(PrefixEvent("evicted", h))
        self._free_slots.append(entry.slot)
        self.stats.evictions += 1

    def drain_events(self) -> list[PrefixEvent]:
        """The stored / evicted events since the last call."""
        events, self._events = self._events, []
        return events


class CachedPrefixes(Protocol):
    """What `snapshot_points` reads of a cache: a `PrefixCache`, or the caches of several data-parallel groups."""

    block_size: int

    def entries(self) -> list[CacheEntry]: ...

    def get(self, prompt: Prompt, position: int) -> CacheEntry | None: ...


def snapshot_points(
    cache: CachedPrefixes, prompt: Prompt, start: int, others: Iterable[Prompt], min_gain: int
) -> list[int]:
    """Where a sequence that resumes at `start` and computes `prompt` takes snapshots, in order.

    The prompt's end; up to MAX_BRANCH_POINTS branch points, the most shared first: the end of the prefix it shares
    with another request's prompt (`others`, waiting or running: the point must leave that prompt a token to compute)
    or with a cached entry it diverges from; the block boundary below each of those. A point other than the end must
    save at least `min_gain` tokens over `start` (the end is always taken: a next chat turn extends any prompt), and
    points already cached are left out."""
    n, b = len(prompt), cache.block_size
    shared: dict[int, int] = {}

    def count(d: int) -> None:
        if d - start >= min_gain and d < n:
            shared[d] = shared.get(d, 0) + 1

    for other in others:
        count(min(common_prefix(prompt, other, b), len(other) - 1))
    for e in cache.entries():
        d = common_prefix(prompt, Prompt(e.tokens, list(e.hashes)), b)
        if d < e.position:  # an entry that is a prefix of the prompt is what the lookup found (or a shorter one)
            count(d)
    branches = sorted(shared, key=lambda d: (shared[d], d), reverse=True)[:MAX_BRANCH_POINTS]
    points = {n} if n > start else set()
    for x in [n, *branches]:
        aligned = x // b * b
        if aligned - start >= min_gain:
            points.add(aligned)
    points.update(branches)
    return sorted(x for x in points if cache.get(prompt, x) is None)
