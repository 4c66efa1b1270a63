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
    """A job handed to this consumer; `entry_id` acknowledges it. `reclaimed` is True for a takeover."""

    entry_id: str
    job: Job
    reclaimed: bool = False


class WorkQueue:
    """One work stream as seen by one consumer (a worker pod) or by a producer (the gateway, a prefill worker)."""

    def __init__(self, client: aioredis.Redis, deployment: str, stream: str, consumer: str = "") -> None:
        self.client = client
        self.deployment = deployment
        self.stream = stream
        self.key = keys.stream_key(deployment, stream)
        self.group = keys.WORKER_GROUP
        self.consumer = consumer

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing, and register this consumer, so the worker counts
        as alive before its first read (idempotent; every worker calls it at start)."""
        with unavailable_as_typed(f"creating consumer group of {self.key}"):
            try:
                await self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            if self.consumer:
                await self.client.xgroup_createconsumer(self.key, self.group, self.consumer)

    async def leave(self) -> bool:
        """Remove this consumer from the group if it holds no pending job (graceful exit); True if removed."""
        with unavailable_as_typed(f"leaving {self.key}"):
            pending: Any = await self.client.xpending_range(self.key, self.group, "-", "+", 1, self.consumer)
            if pending:
                return False
            await self.client.xgroup_delconsumer(self.key, self.group, self.consumer)
            return True

    async def enqueue(self, job: Job) -> str:
        """Append `job`; returns its entry id."""
        with unavailable_as_typed(f"enqueueing into {self.stream}"):
            added = await self.client.xadd(self.key, job.to_fields())  # type: ignore[arg-type]
        return as_text(added)

    def enqueue_in(self, pipe: Pipeline, job: Job) -> None:
        """Queue the append of `job` into `pipe` (a transaction that does more, e.g. the gateway's lease)."""
        pipe.xadd(self.key, job.to_fields())  # type: ignore[arg-type]

    async def read(self, count: int = 1, block_ms: int = MAX_BLOCK_MS) -> list[Delivery]:
        """New jobs for this consumer, waiting at most `block_ms` (0 = return at once)."""
        with unavailable_as_typed(f"reading {self.stream}"):
            try:
                resp: Any = await self.client.xreadgroup(
                    self.group, self.consumer, {self.key: ">"}, count=count, block=min(block_ms, MAX_BLOCK_MS) or None
                )
            except redis.ResponseError as e:
                await self._regroup_if_lost(e)
                return []
        entries = resp[0][1] if resp else []
        return await self._parse(entries, reclaimed=False)

    async def reclaim(self, min_idle_ms: int, count: int = 10) -> list[Delivery]:
        """Take over jobs that other consumers have not touched for `min_idle_ms` (their worker presumably died)."""
        with unavailable_as_typed(f"reclaiming from {self.stream}"):
            try:
                resp: Any = await self.client.xautoclaim(
                    self.key, self.group, self.consumer, min_idle_ms, "0-0", count=count
                )
            except redis.ResponseError as e:
                await self._regroup_if_lost(e)
                return []
        return await self._parse(resp[1], reclaimed=True)

    async def touch(self, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of jobs this consumer still works on, so no one reclaims them (a heartbeat)."""
        if not entry_ids:
            return
        with unavailable_as_typed(f"touching jobs of {self.stream}"):
            try:
                await self.client.xclaim(self.key, self.group, self.consumer, 0, list(entry_ids), justid=True)
            except redis.ResponseError as e:
                await self._regroup_if_lost(e)

    async def _regroup_if_lost(self, e: redis.ResponseError) -> None:
        # A Redis that restarted without persistence lost the stream and its group: recreate both and carry on
        # (the jobs themselves are gone; their clients get errors or timeouts from the gateway).
        if "NOGROUP" not in str(e):
            raise e
        log.warning("consumer group of %s is gone (Redis restarted?); recreating it", self.key)
        await self.ensure_group()

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete a finished job (deleting only acknowledged entries keeps the group's lag exact)."""
        with unavailable_as_typed(f"acknowledging a job of {self.stream}"):
            async with self.client.pipeline(transaction=True) as p:
                p.xack(self.key, self.group, entry_id)
                p.xdel(self.key, entry_id)
                await p.execute()

    async def _parse(self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], reclaimed: bool) -> list[Delivery]:
        out = []
        for raw_id, fields in entries:
            entry_id = as_text(raw_id)
            if fields is None:  # deleted while pending
                continue
            try:
                out.append(Delivery(entry_id, Job.from_fields(fields), reclaimed))
            except MalformedEntry as e:
                log.error("moving malformed entry %s of %s to the dead-letter stream: %s", entry_id, self.key, e)
                await self._dead_letter(entry_id, fields, str(e))
        return out

    async def _dead_letter(self, entry_id: str, fields: Mapping[bytes, bytes], reason: str) -> None:
        with unavailable_as_typed(f"dead-lettering an entry of {self.stream}"):
            async with self.client.pipeline(transaction=True) as p:
                dead: dict[Any, Any] = {**fields, b"dead_reason": reason.encode()}
                p.xadd(dead_letter_key(self.deployment, self.stream), dead)
                p.xack(self.key, self.group, entry_id)
                p.xdel(self.key, entry_id)
                await p.execute()
