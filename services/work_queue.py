"""Work queues between gateway, prefill and decode workers: the Redis streams `prefill` and `decode` (docs/serving.md).

Each stream has the consumer group `workers`. A job is read with XREADGROUP, acknowledged (and deleted) with XACK +
XDEL once its result is safely elsewhere, kept alive by `touch` while it runs, and taken over with XAUTOCLAIM when
its worker stopped touching it. A consumer group lost with a Redis restart is recreated on the next read, touch or
reclaim. The per-request token streams are `token_stream.py`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.protocol import keys
from dsv4.protocol.connection import MAX_BLOCK_MS, unavailable_as_typed
from dsv4.protocol.keys import dead_letter_key
from dsv4.services.stream_entries import MalformedEntry, as_text, pack_ids, unpack_ids

log = logging.getLogger(__name__)

JOB_FORMAT = b"1"


@dataclass(frozen=True)
class Job:
    """One unit of work in the `prefill` or `decode` stream.

    A decode job after a remote prefill names the handoff descriptor in `handoff_key`; it always carries the prompt
    too, so the decode worker can recompute when the handoff is gone or corrupt. `trace_context` holds the W3C
    `traceparent`/`tracestate` of the request.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingSpec
    handoff_key: str | None = None
    trace_context: Mapping[str, str] = field(default_factory=dict)
    enqueued_at_ms: int = 0

    def to_fields(self) -> dict[bytes, bytes]:
        """The stream entry's fields."""
        fields = {
            b"v": JOB_FORMAT,
            b"rid": self.request_id.encode(),
            b"prompt": pack_ids(self.prompt_ids),
            b"sampling": json.dumps(asdict(self.sampling), separators=(",", ":")).encode(),
            b"t": str(self.enqueued_at_ms or int(time.time() * 1000)).encode(),
        }
        if self.handoff_key:
            fields[b"handoff"] = self.handoff_key.encode()
        for k in ("traceparent", "tracestate"):
            if self.trace_context.get(k):
                fields[k.encode()] = self.trace_context[k].encode()
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Job:
        """Parse a stream entry; raises MalformedEntry naming what is wrong."""
        if fields.get(b"v") != JOB_FORMAT:
            raise MalformedEntry(f"job format {fields.get(b'v')!r}, expected {JOB_FORMAT!r}")
        try:
            sampling_raw = json.loads(fields[b"sampling"])
            for k in ("stop_token_ids",):
                if k in sampling_raw:
                    sampling_raw[k] = tuple(sampling_raw[k])
            return cls(
                request_id=fields[b"rid"].decode(),
                prompt_ids=unpack_ids(fields[b"prompt"]),
                sampling=SamplingSpec(**sampling_raw),
                handoff_key=fields[b"handoff"].decode() if b"handoff" in fields else None,
                trace_context={
                    k: fields[k.encode()].decode() for k in ("traceparent", "tracestate") if k.encode() in fields
                },
                enqueued_at_ms=int(fields[b"t"]),
            )
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
            raise MalformedEntry(f"bad job entry: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Delivery:
    """A job handed to this consumer from the stream `stream_key`; `entry_id` acknowledges it there. `reclaimed` is
    True for a takeover (of a job whose worker stopped touching it, or of a dead worker's own stream)."""

    stream_key: str
    entry_id: str
    job: Job
    reclaimed: bool = False


class WorkQueue:
    """One work pool (`prefill` or `decode`) as seen by one consumer (a worker pod) or by a producer (the gateway, a
    prefill worker).

    A pool is the shared stream plus one stream per worker (`own`): the gateway puts a job on a worker's own stream
    when that worker holds the job's prefix, on the shared stream otherwise. A worker reads its own stream first, then
    the shared one. A worker proves it is alive with a key it sets on every heartbeat, with the takeover time as its
    TTL (reading is no proof: a worker with all its slots busy does not read). When that key is gone, the others take
    over what the worker's own stream holds: the jobs it had started (idle pending entries, XAUTOCLAIM, as on the
    shared stream) and the jobs it never read (XREADGROUP on its stream). A worker that leaves moves its unread jobs
    to the shared stream.
    """

    def __init__(self, client: aioredis.Redis, deployment: str, stream: str, consumer: str = "") -> None:
        self.client = client
        self.deployment = deployment
        self.stream = stream
        self.key = keys.stream_key(deployment, stream)
        self.group = keys.WORKER_GROUP
        self.consumer = consumer
        self.own_key = keys.worker_stream_key(deployment, stream, consumer) if consumer else None
        self._workers = keys.workers_key(deployment, stream)

    def key_for(self, consumer: str | None) -> str:
        """The stream a producer appends to: `consumer`'s own stream, or the shared one."""
        return keys.worker_stream_key(self.deployment, self.stream, consumer) if consumer else self.key

    async def ensure_group(self) -> None:
        """Create the streams and their consumer group if missing, and register this consumer (and its own stream),
        so the worker counts as alive before its first read (idempotent; every worker calls it at start)."""
        with unavailable_as_typed(f"creating consumer group of {self.key}"):
            for key in (self.key, self.own_key):
                if key is None:
                    continue
                try:
                    await self.client.xgroup_create(key, self.group, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
                if self.consumer:
                    await self.client.xgroup_createconsumer(key, self.group, self.consumer)
            if self.consumer:
                await self.client.sadd(self._workers, self.consumer)

    async def heartbeat(self, ttl_ms: int) -> None:
        """Say this consumer is alive for the next `ttl_ms` (the others take over its own stream once it lapses)."""
        if self.consumer:
            with unavailable_as_typed(f"heartbeat on {self.stream}"):
                await self.client.set(self._alive(self.consumer), b"1", px=ttl_ms)

    def _alive(self, consumer: str) -> str:
        return keys.worker_alive_key(self.deployment, self.stream, consumer)

    async def leave(self) -> bool:
        """Leave the pool gracefully if this consumer holds no pending job: its unread own jobs move to the shared
        stream, its own stream and its consumer entries go. True if it left."""
        with unavailable_as_typed(f"leaving {self.key}"):
            for key in (self.key, self.own_key):
                if key is not None:
                    pending: Any = await self.client.xpending_range(key, self.group, "-", "+", 1, self.consumer)
                    if pending:
                        return False
            if self.own_key is not None:
                await self._hand_back(self.own_key)
                async with self.client.pipeline(transaction=True) as p:
                    p.delete(self.own_key, self._alive(self.consumer))
                    p.srem(self._workers, self.consumer)
                    await p.execute()
            await self.client.xgroup_delconsumer(self.key, self.group, self.consumer)
            return True

    async def enqueue(self, job: Job, to: str | None = None) -> str:
        """Append `job` (to worker `to`'s own stream, else the shared one); returns its entry id."""
        with unavailable_as_typed(f"enqueueing into {self.stream}"):
            added = await self.client.xadd(self.key_for(to), job.to_fields())  # type: ignore[arg-type]
        return as_text(added)

    def enqueue_in(self, pipe: Pipeline, job: Job, to: str | None = None) -> None:
        """Queue the append of `job` into `pipe` (a transaction that does more, e.g. the gateway's lease)."""
        pipe.xadd(self.key_for(to), job.to_fields())  # type: ignore[arg-type]

    async def read(self, count: int = 1, block_ms: int = MAX_BLOCK_MS) -> list[Delivery]:
        """New jobs for this consumer, its own stream's first, waiting at most `block_ms` (0 = return at once). Up to
        `count` jobs from each stream: every job read is this consumer's to run (a job read and left aside would sit
        until the takeover time)."""
        streams: dict[Any, Any] = {k: ">" for k in (self.own_key, self.key) if k is not None}
        block = min(block_ms, MAX_BLOCK_MS) or None
        with unavailable_as_typed(f"reading {self.stream}"):
            resp: Any = None
            for attempt in range(2):
                try:
                    resp = await self.client.xreadgroup(self.group, self.consumer, streams, count=count, block=block)
                    break
                except redis.ResponseError as e:
                    # Recreate the groups and read once more; lost again meanwhile (a Redis that restarted empty
                    # twice, a stream deleted again): nothing this time, the caller reads again.
                    await self._regroup_if_lost(e)
                    if attempt:
                        return []
        out: list[Delivery] = []
        for key, entries in resp or []:
            out += await self._parse(as_text(key), entries, reclaimed=False)
        return out

    async def reclaim(self, min_idle_ms: int, count: int = 10) -> list[Delivery]:
        """Take over up to `count` jobs whose worker stopped (presumably died): jobs of the shared and the other
        workers' own streams that nobody touched for `min_idle_ms`, and the unread jobs of a worker whose heartbeat
        lapsed."""
        out: list[Delivery] = []
        with unavailable_as_typed(f"reclaiming from {self.stream}"):
            out += await self._autoclaim(self.key, min_idle_ms, count)
            peers: Any = await self.client.smembers(self._workers)
            for peer in sorted(as_text(p) for p in peers):
                if len(out) >= count or peer == self.consumer:
                    continue
                key = keys.worker_stream_key(self.deployment, self.stream, peer)
                out += await self._autoclaim(key, min_idle_ms, count - len(out))
                if len(out) < count and not await self.client.exists(self._alive(peer)):
                    out += await self._take_unread(key, peer, count - len(out))
        return out

    async def touch(self, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of jobs this consumer still works on, so no one reclaims them (a heartbeat)."""
        by_key: dict[str, list[Any]] = {}
        for d in deliveries:
            by_key.setdefault(d.stream_key, []).append(d.entry_id)
        with unavailable_as_typed(f"touching jobs of {self.stream}"):
            for key, ids in by_key.items():
                try:
                    await self.client.xclaim(key, self.group, self.consumer, 0, ids, justid=True)
                except redis.ResponseError as e:
                    await self._regroup_if_lost(e)

    async def _autoclaim(self, key: str, min_idle_ms: int, count: int) -> list[Delivery]:
        try:
            resp: Any = await self.client.xautoclaim(key, self.group, self.consumer, min_idle_ms, "0-0", count=count)
        except redis.ResponseError as e:
            if key == self.key:
                await self._regroup_if_lost(e)
            return []  # a peer's stream that is gone (it left, or Redis restarted)
        return await self._parse(key, resp[1], reclaimed=True)

    async def _take_unread(self, key: str, peer: str, count: int) -> list[Delivery]:
        try:
            resp: Any = await self.client.xreadgroup(self.group, self.consumer, {key: ">"}, count=count)
        except redis.ResponseError:
            return []  # its stream or group is gone
        entries = resp[0][1] if resp else []
        if not entries:
            await self._forget_if_empty(key, peer)
        return await self._parse(key, entries, reclaimed=True)

    async def _forget_if_empty(self, key: str, peer: str) -> None:
        # A dead worker's stream with nothing left in it (no entry at all: acked entries are deleted) goes, so the
        # registry does not grow with every pod that ever ran. A worker that comes back recreates it.
        if int(await self.client.xlen(key)) == 0 and not await self.client.exists(self._alive(peer)):
            async with self.client.pipeline(transaction=True) as p:
                p.delete(key)
                p.srem(self._workers, peer)
                await p.execute()

    async def _hand_back(self, key: str) -> None:
        """Move the unread entries of our own stream to the shared stream (graceful leave)."""
        resp: Any = await self.client.xreadgroup(self.group, self.consumer, {key: ">"}, count=10_000)
        for raw_id, fields in resp[0][1] if resp else []:
            if fields is None:
                continue
            async with self.client.pipeline(transaction=True) as p:
                p.xadd(self.key, fields)
                p.xack(key, self.group, raw_id)
                p.xdel(key, raw_id)
                await p.execute()

    async def _regroup_if_lost(self, e: redis.ResponseError) -> None:
        # A Redis that restarted without persistence lost the stream and its group (NOGROUP), or our own stream was
        # deleted under a blocked read (UNBLOCKED: the others took us for dead): recreate both and carry on (lost
        # jobs' clients get errors or timeouts from the gateway).
        if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
            raise e
        log.warning("consumer group of %s is gone (Redis restarted?); recreating it", self.key)
        await self.ensure_group()

    async def ack(self, d: Delivery) -> None:
        """Acknowledge and delete a finished job (deleting only acknowledged entries keeps the group's lag exact)."""
        with unavailable_as_typed(f"acknowledging a job of {self.stream}"):
            async with self.client.pipeline(transaction=True) as p:
                p.xack(d.stream_key, self.group, d.entry_id)
                p.xdel(d.stream_key, d.entry_id)
                await p.execute()

    async def _parse(
        self, key: str, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], reclaimed: bool
    ) -> list[Delivery]:
        out = []
        for raw_id, fields in entries:
            entry_id = as_text(raw_id)
            if fields is None:  # deleted while pending
                continue
            try:
                out.append(Delivery(key, entry_id, Job.from_fields(fields), reclaimed))
            except MalformedEntry as e:
                log.error("moving malformed entry %s of %s to the dead-letter stream: %s", entry_id, key, e)
                await self._dead_letter(key, entry_id, fields, str(e))
        return out

    async def _dead_letter(self, key: str, entry_id: str, fields: Mapping[bytes, bytes], reason: str) -> None:
        with unavailable_as_typed(f"dead-lettering an entry of {self.stream}"):
            async with self.client.pipeline(transaction=True) as p:
                dead: dict[Any, Any] = {**fields, b"dead_reason": reason.encode()}
                p.xadd(dead_letter_key(self.deployment, self.stream), dead)
                p.xack(key, self.group, entry_id)
                p.xdel(key, entry_id)
                await p.execute()
