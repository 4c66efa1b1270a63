"""Where the planner's inputs come from: Redis consumer groups (backlog per pool and per pod) and the gateways'
Prometheus histograms (TTFT, ITL). I/O is here; the arithmetic is in `planner.py`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from dsv4.protocol import keys
from dsv4.protocol.stats import queue_stats

SCRAPE_TIMEOUT_S = 2.0

Buckets = dict[float, float]  # upper bound → cumulative count, summed over every scraped series


@dataclass(frozen=True)
class QueueSignal:
    """Backlog of one work stream and the pending jobs held by each consumer (a worker pod's name)."""

    backlog: int
    pending_by_consumer: dict[str, int]


async def queue_signal(client: aioredis.Redis, deployment: str, stream: str) -> QueueSignal:
    """Lag + pending of `stream`'s worker group, and pending jobs per consumer (who is cheapest to drain)."""
    stats = await queue_stats(client, deployment, stream)
    per: dict[str, int] = {}
    workers: Any = await client.smembers(keys.workers_key(deployment, stream))
    streams = [keys.stream_key(deployment, stream)]
    streams += [keys.worker_stream_key(deployment, stream, _s(w)) for w in sorted(workers)]
    for key in streams:  # the shared stream and the workers' own streams
        try:
            consumers: Any = await client.xinfo_consumers(key, keys.WORKER_GROUP)
        except aioredis.ResponseError:  # no stream or no group yet: nobody holds work there
            consumers = []
        for c in consumers:
            name = _s(c["name"])
            per[name] = per.get(name, 0) + int(c["pending"])
    return QueueSignal(stats.lag + stats.pending, per)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def histogram_buckets(text: str, name: str) -> Buckets:
    """The cumulative buckets of histogram `name` in a Prometheus exposition, summed over all label sets."""
    out: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + float(sample.value)
    return out


def interval_buckets(now: Buckets, before: Buckets | None) -> list[tuple[float, float]]:
    """Buckets of the observations made between two scrapes (a restarted pod resets its counters: use `now`)."""
    if before is None:
        return []
    if any(now.get(le, 0.0) < count for le, count in before.items()):
        return sorted(now.items())
    return sorted((le, count - before.get(le, 0.0)) for le, count in now.items())


async def _fetch(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url) as resp:
            return await resp.text() if resp.status == 200 else None
    except (TimeoutError, aiohttp.ClientError):
        return None


async def scrape(urls: Sequence[str]) -> list[str]:
    """The /metrics texts of the reachable `urls` (unreachable pods are skipped: no signal, not an error)."""
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        texts = await asyncio.gather(*(_fetch(session, u) for u in urls))
    return [t for t in texts if t is not None]


def sum_buckets(texts: Sequence[str], name: str) -> Buckets | None:
    """Histogram `name` summed over several pods' expositions; None when no pod exported it."""
    total: Buckets = {}
    for text in texts:
        for le, count in histogram_buckets(text, name).items():
            total[le] = total.get(le, 0.0) + count
    if not total:
        return None
    total.setdefault(math.inf, max(total.values()))
    return total
