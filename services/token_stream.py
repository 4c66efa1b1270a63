"""Per-request token streams, from the workers to the gateway, and the request's cancel flag and lease.

One Redis stream per request; every entry carries the index of its first token, so a reader drops duplicates (a
worker that took over may rewrite a token) and detects gaps; the last entry is an end marker with the finish reason
and usage, or an error marker. The gateway holds a lease key for every request it waits on: when the lease is gone
the broker lost the request (it restarted empty), and the reader says so (`RequestLost`) instead of waiting for
tokens that will never come.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.protocol.connection import MAX_BLOCK_MS, unavailable_as_typed
from dsv4.protocol.keys import cancel_key, request_lease_key, token_stream_key
from dsv4.services.stream_entries import MalformedEntry, as_text, pack_ids, pack_logprobs, unpack_ids, unpack_logprobs

TOKEN_STREAM_TTL_S = 600
CANCEL_TTL_S = 600
LEASE_TTL_S = 600
# While tokens flow the reader renews the lease at least this often; while none arrive, after every empty read.
LEASE_RENEW_S = 30.0


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


class RequestLost(RuntimeError):
    """The request's lease is gone from Redis: the broker restarted empty (or was flushed) while it was in flight,
    so its job and tokens are gone too."""


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
        self.deployment = deployment
        self.request_id = request_id
        self.key = token_stream_key(deployment, request_id)
        self.lease_key = request_lease_key(deployment, request_id)
        self.next_index = 0
        self._last_id = "0-0"
        self._leased = False

    def take_lease(self, pipe: Pipeline) -> None:
        """Queue the lease into `pipe`, the transaction that enqueues the request's job: from then on `events`
        raises `RequestLost` once Redis no longer knows the request."""
        pipe.set(self.lease_key, b"1", ex=LEASE_TTL_S)
        self._leased = True

    async def events(self, idle_timeout_s: float) -> AsyncIterator[TokenChunk | Finish]:
        """Yield TokenChunks of new tokens and finally the Finish; raises TokenStreamGap, TokenStreamFailed,
        TokenStreamTimeout, RequestLost or RedisUnavailable."""
        deadline = time.monotonic() + idle_timeout_s
        renewed = time.monotonic()
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise TokenStreamTimeout(f"no tokens on {self.key} for {idle_timeout_s}s")
            with unavailable_as_typed("reading a token stream"):
                resp: Any = await self.client.xread({self.key: self._last_id}, block=min(remaining_ms, MAX_BLOCK_MS))
            if not resp or time.monotonic() - renewed >= LEASE_RENEW_S:
                await self._renew_lease()
                renewed = time.monotonic()
            if not resp:
                continue
            deadline = time.monotonic() + idle_timeout_s
            for raw_id, fields in resp[0][1]:
                self._last_id = as_text(raw_id)
                try:
                    event = self._accept(fields)
                except TokenStreamGap:
                    await self._renew_lease()  # a broker that restarted empty shows as a gap: say what happened
                    raise
                if event is not None:
                    yield event
                    if isinstance(event, Finish):
                        return

    async def _renew_lease(self) -> None:
        if not self._leased:
            return
        with unavailable_as_typed("renewing a request lease"):
            alive = await self.client.expire(self.lease_key, LEASE_TTL_S)
        if not alive:
            raise RequestLost(f"Redis no longer knows request {self.request_id} (the broker restarted empty?)")

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

    async def cancel(self) -> None:
        """Tell the workers to stop generating this request (its client went away or a stop string ended it)."""
        await request_cancel(self.client, self.deployment, self.request_id)

    async def close(self) -> None:
        """Delete the stream and the lease (the gateway is done with the request)."""
        with unavailable_as_typed("deleting a token stream"):
            await self.client.delete(self.key, self.lease_key)


async def request_cancel(client: aioredis.Redis, deployment: str, request_id: str) -> None:
    """Tell the workers that `request_id`'s client went away."""
    with unavailable_as_typed("cancelling a request"):
        await client.set(cancel_key(deployment, request_id), b"1", ex=CANCEL_TTL_S)


async def is_cancelled(client: aioredis.Redis, deployment: str, request_id: str) -> bool:
    """Whether the client of `request_id` went away."""
    with unavailable_as_typed("checking cancellation"):
        return bool(await client.exists(cancel_key(deployment, request_id)))
