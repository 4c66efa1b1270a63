"""What the gateway holds while it runs: settings, the Redis client, tokenizer and encoder, the work queues, the
prefix-aware router of each pool, and a short-lived cache of the prefill queue's stats (the input of every request's
prefill decision)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from dsv4.model_runtime.chat_encoding import ChatEncoder
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.protocol import keys
from dsv4.protocol.stats import QueueStats, queue_stats
from dsv4.services import metrics
from dsv4.services.gateway.routing import PrefixRouter
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.work_queue import WorkQueue


@dataclass
class GatewayState:
    """One per app, made in its lifespan (`app.state.gw`)."""

    settings: GatewaySettings
    client: aioredis.Redis
    tokenizer: Tokenizer
    encoder: ChatEncoder
    prefill: WorkQueue
    decode: WorkQueue
    routers: dict[str, PrefixRouter] = field(default_factory=dict)  # by pool (work stream name)
    _stats: tuple[float, QueueStats] | None = field(default=None)
    _refresh: asyncio.Future[QueueStats] | None = field(default=None)

    @classmethod
    def open(cls, settings: GatewaySettings, client: aioredis.Redis, tokenizer: Tokenizer) -> GatewayState:
        """The state over `client`, with both work queues of the settings' deployment."""
        return cls(
            settings=settings,
            client=client,
            tokenizer=tokenizer,
            encoder=ChatEncoder(tokenizer),
            prefill=WorkQueue(client, settings.deployment, keys.PREFILL_STREAM),
            decode=WorkQueue(client, settings.deployment, keys.DECODE_STREAM),
            routers={
                pool: PrefixRouter(pool, settings.prefix_routing) for pool in (keys.PREFILL_STREAM, keys.DECODE_STREAM)
            },
        )

    async def prefill_stats(self) -> QueueStats:
        """The prefill queue's stats, at most `queue_stats_ttl_s` old; concurrent requests share one refresh."""
        if self._stats is not None and time.monotonic() - self._stats[0] <= self.settings.queue_stats_ttl_s:
            return self._stats[1]
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._fetch_stats())
        return await asyncio.shield(self._refresh)

    async def _fetch_stats(self) -> QueueStats:
        stats = await queue_stats(self.client, self.settings.deployment, keys.PREFILL_STREAM)
        self._stats = (time.monotonic(), stats)
        for gauge, value in (
            (metrics.QUEUE_LENGTH, stats.length),
            (metrics.QUEUE_LAG, stats.lag),
            (metrics.QUEUE_PENDING, stats.pending),
            (metrics.QUEUE_CONSUMERS, stats.consumers),
        ):
            gauge.labels(stream=keys.PREFILL_STREAM).set(value)
        return stats
