"""The queue protocol between gateway, prefill and decode workers, over Redis Streams (docs/serving.md).

Work queues: the streams `prefill` and `decode`, each with the consumer group `workers`. A job is read with
XREADGROUP, acknowledged (and deleted) with XACK + XDEL once its result is safely elsewhere, kept alive by
`touch` while it runs, and taken over with XAUTOCLAIM when its worker stopped touching it. `queue_stats` is the
autoscaling signal the operator's planner reads.

Token streams: one Redis stream per request; every entry carries the index of its first token, so a reader drops
duplicates (a worker that took over may rewrite a token) and detects gaps; the last entry is an end marker with the
finish reason and usage, or an error marker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import redis
import redis.asyncio as aioredis

from dsv4.model_runtime.engine.port import SamplingSpec, TokenLogprobs
from dsv4.protocol import keys
from dsv4.protocol.connection import MAX_BLOCK_MS, unavailable_as_typed
from dsv4.protocol.keys import cancel_key, dead_letter_key, token_stream_key

log = logging.getLogger(__name__)

JOB_FORMAT = b"1"
TOKEN_STREAM_TTL_S = 600
CANCEL_TTL_S = 600


# ---------------------------------------------------------------------------------------------------------- jobs


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 (4 bytes a token; JSON would be 2-3x larger for long prompts)."""
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(data: bytes) -> tuple[int, ...]:
    """Inverse of `pack_ids`; raises ValueError on a length that is not a multiple of 4."""
    if len(data) % 4:
        raise ValueError(f"packed token ids have {len(data)} bytes, not a multiple of 4")
    return struct.unpack(f"<{len(data) // 4}I", data)


class MalformedEntry(ValueError):
    """A stream entry that does not follow this protocol."""


def pack_logprobs(logprobs: Sequence[TokenLogprobs]) -> bytes:
    """Logprobs of consecutive tokens as JSON: [[logprob, [[id, logprob], …]], …] (small next to the text)."""
    return json.dumps([[lp.logprob, [list(t) for t in lp.top]] for lp in logprobs], separators=(",", ":")).encode()


def unpack_logprobs(data: bytes, count: int) -> tuple[TokenLogprobs, ...]:
    """Inverse of `pack_logprobs`; raises MalformedEntry unless it holds exactly `count` well-formed entries."""
    try:
        raw = json.loads(data)
        out = tuple(TokenLogprobs(float(lp), tuple((int(i), float(v)) for i, v in top)) for lp, top in raw)
    except (ValueError, TypeError) as e:
        raise MalformedEntry(f"unreadable token logprobs: {e}") from e
    if len(out) != count:
        raise MalformedEntry(f"{len(out)} token logprobs for {count} tokens")
    return out


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
            entry_id = await self.client.xadd(self.key, job.to_fields())  # type: ignore[arg-type]
        return _s(entry_id)

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
            entry_id = _s(raw_id)
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


# ---------------------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as reported in the end marker."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenChunk:
    """Consecutive new tokens of a request; `start` is the index of the first one. `logprobs`, when the worker
    sent them, has one entry per token."""

    start: int
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class Finish:
    """The end marker: why generation stopped and the usage."""

    reason: str
    usage: Usage


class TokenStreamGap(RuntimeError):
    """Tokens are missing from a request's stream (a writer skipped indexes, or Redis lost entries)."""


class TokenStreamFailed(RuntimeError):
    """The worker reported an error for the request instead of an end marker."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class TokenStreamTimeout(TimeoutError):
    """Nothing arrived on a request's stream within the reader's idle timeout."""


class _StreamAppender:
    """Appends to token streams of one client, coalescing the appends of all requests into one pipeline.

    A decode worker streams one token per request per engine step; with a round trip per token its event loop
    spent most of its time in redis-py and socket writes, holding the GIL the engine thread needs. Appends made
    while a pipeline is in flight go out together in the next one, in call order (so an end marker never
    overtakes the tokens before it); each caller still returns only once its entry is in Redis.
    """

    _by_client: ClassVar[weakref.WeakKeyDictionary[aioredis.Redis, _StreamAppender]] = weakref.WeakKeyDictionary()

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = weakref.ref(client)  # a strong reference would keep the registry's key alive forever
        self._pending: list[tuple[str, dict[bytes, bytes], int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, client: aioredis.Redis) -> _StreamAppender:
        """The appender shared by every writer on `client`."""
        appender = cls._by_client.get(client)
        if appender is None:
            appender = cls._by_client[client] = cls(client)
        return appender

    async def append(self, key: str, fields: dict[bytes, bytes], ttl_s: int) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, fields, ttl_s, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            client = self._client()
            try:
                if client is None:
                    raise RuntimeError("the Redis client of these token streams is gone")
                with unavailable_as_typed("writing a token stream"):
                    async with client.pipeline(transaction=False) as p:
                        for key, fields, _, _ in batch:
                            p.xadd(key, fields)  # type: ignore[arg-type]
                        for key, ttl in {key: ttl for key, _, ttl, _ in batch}.items():
                            p.expire(key, ttl)
                        await p.execute()
            except Exception as e:  # every caller of the batch gets the failure
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            for *_, done in batch:
                if not done.done():
                    done.set_result(None)


class TokenWriter:
    """The worker side of one request's token stream."""

    def __init__(
        self, client: aioredis.Redis, deployment: str, request_id: str, ttl_s: int = TOKEN_STREAM_TTL_S
    ) -> None:
        self.client = client
        self.key = token_stream_key(deployment, request_id)
        self.ttl_s = ttl_s

    async def write(
        self, start: int, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None] | None = None
    ) -> None:
        """Append tokens `start`, `start+1`, …; rewriting an index already written is harmless. `logprobs`, one
        per token, travel with them when every one is known."""
        fields = {b"i": str(start).encode(), b"ids": pack_ids(token_ids)}
        if logprobs is not None and len(logprobs) == len(token_ids) and all(lp is not None for lp in logprobs):
            fields[b"lp"] = pack_logprobs([lp for lp in logprobs if lp is not None])
        await self._add(fields)

    async def finish(self, reason: str, usage: Usage) -> None:
        """Append the end marker."""
        u = json.dumps({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens})
        await self._add({b"end": reason.encode(), b"usage": u.encode()})

    async def fail(self, message: str, code: str = "internal_error") -> None:
        """Append an error marker; the gateway turns it into an error for the client."""
        await self._add({b"error": message.encode(), b"code": code.encode()})

    async def streamed(self) -> list[int]:
        """Tokens 0..n-1 already in the stream, without duplicates (what a worker taking over must resume after)."""
        return (await self.progress())[0]

    async def progress(self) -> tuple[list[int], bool]:
        """The tokens already streamed and whether an end or error marker was written (the request is over)."""
        with unavailable_as_typed("reading a token stream"):
            entries: Any = await self.client.xrange(self.key, "-", "+")
        tokens: list[int] = []
        ended = False
        for _, fields in entries:
            if b"i" in fields:
                start, ids = int(fields[b"i"]), unpack_ids(fields[b"ids"])
                if start <= len(tokens) < start + len(ids):
                    tokens.extend(ids[len(tokens) - start :])
            elif b"end" in fields or b"error" in fields:
                ended = True
        return tokens, ended

    async def _add(self, fields: dict[bytes, bytes]) -> None:
        await _StreamAppender.of(self.client).append(self.key, fields, self.ttl_s)


class TokenReader:
    """The gateway side of one request's token stream: new tokens exactly once, in order, then the end marker."""

    def __init__(self, client: aioredis.Redis, deployment: str, request_id: str) -> None:
        self.client = client
        self.key = token_stream_key(deployment, request_id)
        self.next_index = 0
        self._last_id = "0-0"

    async def events(self, idle_timeout_s: float) -> AsyncIterator[TokenChunk | Finish]:
        """Yield TokenChunks of new tokens and finally the Finish; raises TokenStreamGap, TokenStreamFailed,
        TokenStreamTimeout or RedisUnavailable."""
        deadline = time.monotonic() + idle_timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise TokenStreamTimeout(f"no tokens on {self.key} for {idle_timeout_s}s")
            with unavailable_as_typed("reading a token stream"):
                resp: Any = await self.client.xread({self.key: self._last_id}, block=min(remaining_ms, MAX_BLOCK_MS))
            if not resp:
                continue
            deadline = time.monotonic() + idle_timeout_s
            for raw_id, fields in resp[0][1]:
                self._last_id = _s(raw_id)
                event = self._accept(fields)
                if event is not None:
                    yield event
                    if isinstance(event, Finish):
                        return

    def _accept(self, fields: Mapping[bytes, bytes]) -> TokenChunk | Finish | None:
        if b"i" in fields:
            start, ids = int(fields[b"i"]), unpack_ids(fields[b"ids"])
            if start > self.next_index:
                raise TokenStreamGap(f"{self.key}: token {start} arrived while {self.next_index} was expected")
            skip = self.next_index - start
            new = ids[skip:]
            if not new:
                return None
            logprobs = unpack_logprobs(fields[b"lp"], len(ids))[skip:] if b"lp" in fields else None
            chunk = TokenChunk(self.next_index, tuple(new), logprobs)
            self.next_index += len(new)
            return chunk
        if b"end" in fields:
            usage = json.loads(fields[b"usage"])
            if usage["completion_tokens"] > self.next_index:
                raise TokenStreamGap(
                    f"{self.key}: ended after {usage['completion_tokens']} tokens, only {self.next_index} arrived"
                )
            return Finish(fields[b"end"].decode(), Usage(usage["prompt_tokens"], usage["completion_tokens"]))
        if b"error" in fields:
            raise TokenStreamFailed(fields[b"error"].decode(), fields.get(b"code", b"internal_error").decode())
        raise MalformedEntry(f"{self.key}: entry with fields {sorted(fields)}")

    async def close(self) -> None:
        """Delete the stream (the gateway is done with it)."""
        with unavailable_as_typed("deleting a token stream"):
            await self.client.delete(self.key)


# ---------------------------------------------------------------------------------------------------------- cancel


async def request_cancel(client: aioredis.Redis, deployment: str, request_id: str) -> None:
    """Tell the workers that `request_id`'s client went away."""
    with unavailable_as_typed("cancelling a request"):
        await client.set(cancel_key(deployment, request_id), b"1", ex=CANCEL_TTL_S)


async def is_cancelled(client: aioredis.Redis, deployment: str, request_id: str) -> bool:
    """Whether the client of `request_id` went away."""
    with unavailable_as_typed("checking cancellation"):
        return bool(await client.exists(cancel_key(deployment, request_id)))


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
