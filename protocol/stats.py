"""The autoscaling signal of the work queues: what the operator's planner and the gateway's prefill decision read.

Lag, pending, live consumers and the age of the oldest waiting job of one work pool: its shared stream plus its
workers' own streams (prefix-aware routing puts jobs there), each read in one Redis snapshot (the figures KEDA's
Redis Streams scaler reads, plus the queue age).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from dsv4.protocol import keys
from dsv4.protocol.connection import unavailable_as_typed

# A worker polls at least every connection.MAX_BLOCK_MS; one not seen for this long is presumed dead.
CONSUMER_ALIVE_MS = 10_000


@dataclass(frozen=True)
class QueueStats:
    """The autoscaling signal of one work pool (what KEDA's Redis Streams scaler reads, plus the queue age), summed over
    its shared stream and its workers' own streams."""

    stream: str
    length: int  # entries in the streams (waiting + pending; acknowledged ones are deleted)
    lag: int  # entries not yet delivered to any consumer
    pending: int  # delivered, not yet acknowledged (in progress)
    consumers: int  # consumers of the shared stream seen within CONSUMER_ALIVE_MS (a dead one lingers in the group)
    oldest_waiting_age_s: float  # age of the oldest undelivered job; 0 when none waits


async def queue_stats(client: aioredis.Redis, deployment: str, stream: str) -> QueueStats:
    """Lag, pending and age of the work pool `stream` of `deployment`; the one function the planner calls."""
    key = keys.stream_key(deployment, stream)
    with unavailable_as_typed(f"reading stats of {key}"):
        shared, alive = await _stream_stats(client, key, count_consumers=True)
        workers: Any = await client.smembers(keys.workers_key(deployment, stream))
        parts = [shared]
        for worker in sorted(_s(w) for w in workers):
            part, _ = await _stream_stats(client, keys.worker_stream_key(deployment, stream, worker))
            parts.append(part)
    return QueueStats(
        stream,
        length=sum(p[0] for p in parts),
        lag=sum(p[1] for p in parts),
        pending=sum(p[2] for p in parts),
        consumers=alive,
        oldest_waiting_age_s=max(p[3] for p in parts),
    )


async def _stream_stats(
    client: aioredis.Redis, key: str, count_consumers: bool = False
) -> tuple[tuple[int, int, int, float], int]:
    """((length, lag, pending, oldest waiting age), live consumers) of one stream and its worker group."""
    # One MULTI snapshot: read apart, an ack (XACK + XDEL) landing between the two reads would show a job that is
    # neither pending nor gone.
    async with client.pipeline(transaction=True) as p:
        p.xlen(key)
        p.xinfo_groups(key)
        length_raw, groups_raw = await p.execute(raise_on_error=False)
    if isinstance(length_raw, BaseException):
        raise length_raw
    length = int(length_raw)
    groups: Any = [] if isinstance(groups_raw, redis.ResponseError) else groups_raw  # no such stream yet
    if isinstance(groups, BaseException):
        raise groups
    group = next((g for g in groups if _s(g["name"]) == keys.WORKER_GROUP), None)
    if group is None:
        return (length, length, 0, await _age_after(client, key, "-")), 0
    alive = 0
    if count_consumers and group["consumers"]:
        consumers: Any = await client.xinfo_consumers(key, keys.WORKER_GROUP)
        alive = sum(1 for c in consumers if int(c["idle"]) < CONSUMER_ALIVE_MS)
    last = _s(group["last-delivered-id"])
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell after some deletions; count the entries after last-delivered-id
        undelivered: Any = await client.xrange(key, f"({last}", "+")
        lag = len(undelivered)
    age = await _age_after(client, key, f"({last}") if lag else 0.0
    return (length, int(lag), int(group["pending"]), age), alive


async def _age_after(client: aioredis.Redis, key: str, start: str) -> float:
    first: Any = await client.xrange(key, start, "+", count=1)
    if not first:
        return 0.0
    ms = int(_s(first[0][0]).split("-")[0])
    return max(0.0, time.time() - ms / 1000)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
