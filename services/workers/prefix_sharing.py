"""A worker's side of prefix sharing through Redis (docs/serving.md, "Prefix caching").

* KV events, for the gateway's prefix-aware routing: every PUBLISH_EVERY_S the prefixes the engine's cache stored and
  evicted since, and every `kv_events.SNAPSHOT_EVERY_S` a snapshot of all it holds with its load; a draining worker
  announces that it left, so the gateway stops pushing work to it. The engine's cache counters go to the deployment's
  prefix-stats hash, from which the operator's status shows the hit rate.
* The shared tier (prefill workers, a tier budget > 0): every prefix the engine newly stores is exported and published
  (at most PUBLISH_CONCURRENCY at once, in the background: never on a request's path); before a prefill, a longer
  prefix in the tier than in the engine's own cache is fetched and imported. The engine verifies every blob (format,
  model fingerprint, checksums, positions); one it refuses is discarded from the tier and the prefix recomputed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from dsv4.model_runtime.engine.port import Engine, KVImportError
from dsv4.model_runtime.engine.prefix_hash import chain_hashes, chain_seed
from dsv4.protocol import keys
from dsv4.protocol.connection import RedisUnavailable, unavailable_as_typed
from dsv4.services import kv_events, metrics
from dsv4.services.kv_events import KVEvent, WorkerLoad
from dsv4.services.prefix_tier import PrefixTier

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 0.5
PUBLISH_CONCURRENCY = 2
# Counters the operator sums for the status (LLMEngine.stats_extra names); a worker's entry older than
# STATS_STALE_S is a worker that is gone.
STATS_FIELDS = ("prefill_tokens", "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_query_tokens",
                "prefix_cache_hit_tokens")  # fmt: skip
STATS_STALE_S = 60.0


class PrefixSharing:
    """KV events, the prefix-stats entry and the shared tier of one worker (`pool`: the work stream it serves)."""

    def __init__(
        self,
        client: aioredis.Redis,
        deployment: str,
        pool: str,
        worker: str,
        engine: Engine,
        tier: PrefixTier | None,
        snapshot_every_s: float = kv_events.SNAPSHOT_EVERY_S,
    ) -> None:
        block_size = engine.prefix_block_size
        if block_size is None:
            raise ValueError("prefix sharing needs an engine with its prefix cache on")
        self.client, self.deployment, self.pool, self.worker = client, deployment, pool, worker
        self.engine, self.tier, self.block_size = engine, tier, block_size
        self.snapshot_every_s = snapshot_every_s
        self._seed = chain_seed(engine.model_fingerprint, block_size)
        self._publishing: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._tier_evictions = 0

    def _event(self, op: kv_events.Op, hashes: Sequence[str], load: WorkerLoad | None = None) -> KVEvent:
        return KVEvent(self.worker, op, tuple(hashes), self.block_size, load, self.engine.model_fingerprint)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish events (and tier blobs) until `stop` is set; then announce that this worker left."""
        next_snapshot = 0.0
        while not stop.is_set():
            try:
                await self._publish_events()
                if time.monotonic() >= next_snapshot:
                    await self._publish_snapshot()
                    next_snapshot = time.monotonic() + self.snapshot_every_s
            except RedisUnavailable as e:
                log.warning("prefix sharing: %s; retrying", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PUBLISH_EVERY_S)
        await self.leave()

    async def leave(self) -> None:
        """Tell the gateways this worker takes no more work, and wait for the tier publications in flight."""
        try:
            await kv_events.publish(self.client, self.deployment, self.pool, self._event("left", ()))
            with unavailable_as_typed("removing prefix stats"):
                await self.client.hdel(keys.prefix_stats_key(self.deployment), self.worker)
        except RedisUnavailable as e:
            log.warning("could not announce leaving: %s", e)
        if self._publishing:
            await asyncio.wait(self._publishing, timeout=10)

    async def _publish_events(self) -> None:
        events = self.engine.prefix_events()
        run: list[str] = []
        for i, ev in enumerate(events):  # consecutive events of one kind become one KV event, in order
            run.append(ev.chain_hash)
            if i + 1 == len(events) or events[i + 1].op != ev.op:
                await kv_events.publish(self.client, self.deployment, self.pool, self._event(ev.op, run))
                run = []
            if ev.op == "stored" and self.tier is not None and self.tier.budget_bytes > 0:
                task = asyncio.create_task(self._publish_to_tier(ev.chain_hash))
                self._publishing.add(task)
                task.add_done_callback(self._publishing.discard)

    async def _publish_snapshot(self) -> None:
        stats = self.engine.stats()
        load = WorkerLoad(stats.running_requests, stats.waiting_requests)
        held = await self.engine.held_prefixes()
        await kv_events.publish(self.client, self.deployment, self.pool, self._event("snapshot", held, load))
        entry: dict[str, str | float] = {name: stats.extra.get(name, 0.0) for name in STATS_FIELDS}
        entry |= {"pool": self.pool, "t": time.time()}
        with unavailable_as_typed("writing prefix stats"):
            await self.client.hset(keys.prefix_stats_key(self.deployment), self.worker, json.dumps(entry))
        if self.tier is not None:
            tier = await self.tier.stats()
            metrics.PREFIX_BYTES.labels(role=self.pool, tier="redis").set(tier.bytes)
            metrics.PREFIX_EVICTIONS.labels(role=self.pool, tier="redis").inc(
                self.tier.evictions - self._tier_evictions
            )
            self._tier_evictions = self.tier.evictions

    async def _publish_to_tier(self, chain_hash: str) -> None:
        assert self.tier is not None
        async with self._slots:
            try:
                if await self.tier.longest([chain_hash]) == 0:
                    return  # another worker published it already
                blob = await self.engine.export_prefix(chain_hash)
                if blob is not None and await self.tier.publish(chain_hash, blob):
                    metrics.PREFIX_TIER_PUBLISHED.inc()
            except RedisUnavailable as e:
                log.warning("prefix %s not published to the tier: %s", chain_hash, e)

    def prompt_hashes(self, token_ids: Sequence[int], max_blocks: int | None = None) -> list[str]:
        """The chain hashes of the full blocks of `token_ids`, as this worker's engine keys them."""
        return chain_hashes(self._seed, token_ids, self.block_size, max_blocks)

    async def before_prefill(self, prompt_ids: Sequence[int]) -> int:
        """Import the longest prefix of the prompt that the tier holds, if longer than what the engine has; returns
        the imported positions (0 when nothing was imported). Tier trouble is logged, never a failed request."""
        tier = self.tier
        if tier is None or len(prompt_ids) < 2:
            return 0
        b = self.block_size
        hashes = self.prompt_hashes(prompt_ids, max_blocks=(len(prompt_ids) - 1) // b)
        local = await self.engine.cached_prefix_len(prompt_ids)
        skip = local // b  # blocks the engine has already
        if len(hashes) <= skip:
            return 0
        try:
            found = await tier.longest(hashes[skip:])
            if found < 0:
                return 0
            chain_hash, length = hashes[skip + found], (skip + found + 1) * b
            blob = await tier.fetch(chain_hash)
            if blob is None:
                metrics.PREFIX_TIER_IMPORTS.labels(result="gone").inc()
                return 0
            try:
                imported = await self.engine.import_prefix(list(prompt_ids[:length]), blob)
            except KVImportError as e:
                log.warning("prefix %s from the tier refused (%s): discarded, computing it", chain_hash, e)
                metrics.PREFIX_TIER_IMPORTS.labels(result="refused").inc()
                await tier.discard(chain_hash)
                return 0
        except RedisUnavailable as e:
            log.warning("prefix tier unavailable (%s): computing the prompt", e)
            return 0
        metrics.PREFIX_TIER_IMPORTS.labels(result="imported").inc()
        return length if imported else 0
