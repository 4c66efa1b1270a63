"""The shared prefix tier: exported KV states of prompt prefixes in Redis, so any prefill worker can continue a
prefix another one computed.

A prefix is stored under the chain hash of its last block (`model_runtime/engine/prefix_hash.py`) in the engine's
KV export format (versioned, model-fingerprinted, crc32c per chunk); the reader hands the blob to the engine, which
verifies it, and a blob it refuses is discarded here and the prefix recomputed: nothing from Redis is trusted
unverified. Every blob has a TTL, and the tier keeps the total bytes under a budget by evicting the least recently
used prefixes. The tier may live in the serving Redis or in a separate one (its own URL).

Concurrency: publishing the same prefix twice stores and counts it once (SET NX); an eviction counts a prefix out
only if it removed it from the LRU set itself (ZREM's answer), so racing evictors never count one blob twice. The
byte count can run over the budget by the blobs published between two evictions; it never drifts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from dsv4.protocol import keys
from dsv4.protocol.connection import unavailable_as_typed

EVICT_BATCH = 16


@dataclass(frozen=True)
class TierStats:
    """What the tier holds now."""

    bytes: int
    prefixes: int


class PrefixTier:
    """One deployment's prefixes in one Redis (`budget_bytes` = 0 switches publishing off)."""

    def __init__(self, client: aioredis.Redis, deployment: str, budget_bytes: int, ttl_s: int) -> None:
        if budget_bytes < 0 or ttl_s < 1:
            raise ValueError(f"prefix tier: budget_bytes must be >= 0 and ttl_s >= 1, got {budget_bytes}, {ttl_s}")
        self.client, self.deployment = client, deployment
        self.budget_bytes, self.ttl_s = budget_bytes, ttl_s
        self._lru = keys.prefix_lru_key(deployment)
        self._sizes = keys.prefix_sizes_key(deployment)
        self._bytes = keys.prefix_bytes_key(deployment)
        self.evictions = 0  # prefixes this client evicted for the budget or found expired

    def _blob(self, chain_hash: str) -> str:
        return keys.prefix_blob_key(self.deployment, chain_hash)

    async def publish(self, chain_hash: str, blob: bytes) -> bool:
        """Store a prefix (refreshing it if present); False when it cannot fit the budget at all."""
        if not 0 < len(blob) <= self.budget_bytes:
            return False
        now_ms = int(time.time() * 1000)
        with unavailable_as_typed("publishing a prefix"):
            created = await self.client.set(self._blob(chain_hash), blob, ex=self.ttl_s, nx=True)
            async with self.client.pipeline(transaction=True) as p:
                p.zadd(self._lru, {chain_hash: now_ms})
                if created:
                    p.hset(self._sizes, chain_hash, len(blob))
                    p.incrby(self._bytes, len(blob))
                else:
                    p.expire(self._blob(chain_hash), self.ttl_s)
                await p.execute()
            await self._forget_expired(now_ms)
            await self._evict_over_budget()
        return True

    async def longest(self, chain_hashes: Sequence[str]) -> int:
        """Index of the longest prefix of `chain_hashes` present in the tier, -1 when none (one round trip)."""
        if not chain_hashes:
            return -1
        with unavailable_as_typed("looking up prefixes"):
            async with self.client.pipeline(transaction=False) as p:
                for h in chain_hashes:
                    p.exists(self._blob(h))
                present: list[Any] = await p.execute()
        return max((i for i, hit in enumerate(present) if hit), default=-1)

    async def fetch(self, chain_hash: str) -> bytes | None:
        """The blob of a prefix (refreshing its TTL and LRU place), None when it is gone."""
        with unavailable_as_typed("fetching a prefix"):
            blob: Any = await self.client.get(self._blob(chain_hash))
            if blob is not None:
                async with self.client.pipeline(transaction=False) as p:
                    p.zadd(self._lru, {chain_hash: int(time.time() * 1000)}, xx=True)
                    p.expire(self._blob(chain_hash), self.ttl_s)
                    await p.execute()
        return blob

    async def discard(self, chain_hash: str) -> None:
        """Remove a prefix (the engine refused its blob)."""
        with unavailable_as_typed("discarding a prefix"):
            await self._remove(chain_hash)

    async def stats(self) -> TierStats:
        """Bytes and prefixes held."""
        with unavailable_as_typed("reading the prefix tier's size"):
            async with self.client.pipeline(transaction=True) as p:
                p.get(self._bytes)
                p.zcard(self._lru)
                total, count = await p.execute()
        return TierStats(int(total or 0), int(count))

    async def _remove(self, chain_hash: str) -> bool:
        size = await self.client.hget(self._sizes, chain_hash)
        if not await self.client.zrem(self._lru, chain_hash):
            return False  # someone else removed it (and counted it out)
        async with self.client.pipeline(transaction=True) as p:
            p.delete(self._blob(chain_hash))
            p.hdel(self._sizes, chain_hash)
            if size is not None:
                p.decrby(self._bytes, int(size))
            await p.execute()
        return True

    async def _forget_expired(self, now_ms: int) -> None:
        # A blob whose TTL ran out is gone from Redis, but its LRU entry and its bytes are still counted.
        expired: list[Any] = await self.client.zrangebyscore(self._lru, "-inf", now_ms - self.ttl_s * 1000)
        for member in expired:
            self.evictions += await self._remove(_s(member))

    async def _evict_over_budget(self) -> None:
        while int(await self.client.get(self._bytes) or 0) > self.budget_bytes:
            oldest: list[Any] = await self.client.zrange(self._lru, 0, EVICT_BATCH - 1)
            if not oldest:
                return
            for member in oldest:
                self.evictions += await self._remove(_s(member))
                if int(await self.client.get(self._bytes) or 0) <= self.budget_bytes:
                    return


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
