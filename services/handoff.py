"""KV handoff from a prefill worker to a decode worker (docs/serving.md).

The writer stores the engine's exported KV state (opaque bytes) as the engine cut it, one chunk of at most 4 MiB per
value, under a TTL lease, then writes a descriptor naming format, model fingerprint, chunk sizes, the first token
and the trace context. The descriptor goes last, so a reader that finds it finds every chunk; each write uses fresh
keys, so a retried prefill never overwrites a handoff someone is reading. The reader checks what the handoff owns
(descriptor, fingerprint, lease, chunk count and sizes) and returns the bytes or raises a `HandoffError` subclass,
which the decode worker answers with a recompute. The bytes themselves are checksummed once, by the KV format
(`model_runtime/engine/kv_export.py`: crc32c of its header and of every body chunk), and verified when the engine
imports them; a damaged byte is a `KVImportError` there, answered with the same recompute.

Two data planes: `redis` (chunks are Redis strings next to the descriptor) and `direct` (the prefill worker keeps
the chunks in memory and serves them on its worker port; Redis holds only the descriptor).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import httpx
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from dsv4.model_runtime.engine.port import KVMeta
from dsv4.protocol import keys
from dsv4.protocol.config import MAX_CHUNK_BYTES
from dsv4.protocol.connection import UNAVAILABLE_ERRORS, unavailable_as_typed
from dsv4.protocol.keys import chunk_key, descriptor_key
from dsv4.services.kv_direct import DIRECT_PATH, DirectStore

log = logging.getLogger(__name__)

DESCRIPTOR_FORMAT = 2  # 2: no per-chunk checksums (the KV format has its own)
DEFAULT_TTL_S = 120
PIPELINE_CHUNKS = 8  # chunks in flight per round trip: 32 MiB at the maximum chunk size

Transport = Literal["redis", "direct"]


class HandoffError(RuntimeError):
    """The handoff cannot be used; the decode worker recomputes the prefill."""


class HandoffMissing(HandoffError):
    """No descriptor (never written, already consumed, or its lease ran out), or the direct writer is gone."""


class HandoffExpired(HandoffError):
    """The descriptor was found but its lease ran out before every chunk was read."""


class HandoffCorrupt(HandoffError):
    """A chunk or the descriptor fails verification (size, count, syntax)."""


class FingerprintMismatch(HandoffError):
    """The state was exported by a different model or KV format than the reader's engine."""


def handoff_id_of(key: str) -> str:
    """The handoff id inside a descriptor key; raises HandoffCorrupt for a key that is not one."""
    handoff_id = keys.handoff_id_of(key)
    if handoff_id is None:
        raise HandoffCorrupt(f"not a handoff descriptor key: {key!r}")
    return handoff_id


@dataclass(frozen=True)
class Descriptor:
    """Everything a reader needs to fetch and verify a handoff; JSON in Redis."""

    handoff_id: str
    request_id: str
    kv_format_version: int
    model_fingerprint: str
    total_bytes: int
    num_tokens: int
    chunk_sizes: tuple[int, ...]
    first_token: int
    transport: Transport
    lease_deadline_ms: int
    direct_url: str | None = None
    trace_context: Mapping[str, str] = field(default_factory=dict)
    format_version: int = DESCRIPTOR_FORMAT

    def to_json(self) -> bytes:
        # Shallow on purpose: `asdict` deep-copies every field and cost ~0.1 ms, a tenth of a 1 MiB handoff.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["trace_context"] = dict(self.trace_context)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Descriptor:
        """Parse and check internal consistency; raises HandoffCorrupt."""
        try:
            d: dict[str, Any] = json.loads(raw)
            if not isinstance(d, dict):
                raise HandoffCorrupt(f"handoff descriptor is a JSON {type(d).__name__}, not an object")
            if d.get("format_version") != DESCRIPTOR_FORMAT:
                raise HandoffCorrupt(f"descriptor format {d.get('format_version')!r}, expected {DESCRIPTOR_FORMAT}")
            d["chunk_sizes"] = tuple(int(x) for x in d["chunk_sizes"])
            desc = cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise HandoffCorrupt(f"unreadable handoff descriptor: {type(e).__name__}: {e}") from e
        if sum(desc.chunk_sizes) != desc.total_bytes or any(not 0 < n <= MAX_CHUNK_BYTES for n in desc.chunk_sizes):
            raise HandoffCorrupt(f"descriptor {desc.handoff_id}: chunk sizes disagree with total_bytes or the limit")
        if desc.transport not in ("redis", "direct") or (desc.transport == "direct" and not desc.direct_url):
            raise HandoffCorrupt(f"descriptor {desc.handoff_id}: bad transport {desc.transport!r}")
        return desc


@dataclass(frozen=True)
class Handoff:
    """A verified handoff: the descriptor and the KV bytes, ready for `Engine.submit_decode`."""

    key: str
    descriptor: Descriptor
    blob: bytes


def _checked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The non-empty chunks, each within the size of one handoff value."""
    for c in chunks:
        if len(c) > MAX_CHUNK_BYTES:
            raise ValueError(
                f"KV export chunk of {len(c)} bytes exceeds the handoff's {MAX_CHUNK_BYTES}: "
                "build the engine with an export chunk size of at most kvHandoff.chunkBytes"
            )
        if c:
            yield c


class HandoffWriter:
    """The prefill side: writes one handoff per call to `write`."""

    def __init__(
        self,
        client: aioredis.Redis,
        deployment: str,
        *,
        transport: Transport = "redis",
        ttl_s: float = DEFAULT_TTL_S,
        direct_store: DirectStore | None = None,
        direct_url: str | None = None,
    ) -> None:
        if transport == "direct" and (direct_store is None or not direct_url):
            raise ValueError("the direct data plane needs a DirectStore and the URL where it is served")
        self.client = client
        self.deployment = deployment
        self.transport = transport
        self.ttl_s = ttl_s
        self.direct_store = direct_store
        self.direct_url = direct_url

    async def write(
        self,
        request_id: str,
        meta: KVMeta,
        chunks: Iterable[bytes],
        first_token: int,
        trace_context: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Store the state and then its descriptor; returns the descriptor (its key: `descriptor_key`).

        `chunks` are stored as they come, one value each (empty ones skipped), so each must be at most
        MAX_CHUNK_BYTES: the worker builds its engine with that export chunk size. Raises ValueError for a larger
        chunk or a byte count other than `meta.total_bytes`, RedisUnavailable, or whatever `chunks` raises; in all
        cases the chunks written so far are deleted
        (when Redis is reachable; otherwise their lease cleans them up) and no descriptor exists.
        """
        if not request_id or any(c in request_id for c in ":{}"):
            raise ValueError(f"request id {request_id!r} cannot be part of a Redis key")
        handoff_id = f"{request_id}.{uuid.uuid4().hex[:12]}"
        deadline_ms = int((time.time() + self.ttl_s) * 1000)
        sizes: list[int] = []
        try:
            pipe = self.client.pipeline(transaction=False)
            if self.transport == "redis":
                await self._queue_redis_chunks(pipe, handoff_id, chunks, deadline_ms, sizes)
            else:
                kept = list(_checked(chunks))
                sizes.extend(len(c) for c in kept)
                assert self.direct_store is not None
                self.direct_store.put(handoff_id, kept, deadline_ms / 1000)
            if sum(sizes) != meta.total_bytes:
                raise ValueError(f"KV export yielded {sum(sizes)} bytes, its metadata says {meta.total_bytes}")
            desc = Descriptor(
                handoff_id=handoff_id,
                request_id=request_id,
                kv_format_version=meta.format_version,
                model_fingerprint=meta.model_fingerprint,
                total_bytes=meta.total_bytes,
                num_tokens=meta.num_tokens,
                chunk_sizes=tuple(sizes),
                first_token=first_token,
                transport=self.transport,
                lease_deadline_ms=deadline_ms,
                direct_url=self.direct_url if self.transport == "direct" else None,
                trace_context=dict(trace_context or {}),
            )
            # Same pipeline as the last chunks: Redis runs it in order, so the descriptor still lands last.
            pipe.set(descriptor_key(self.deployment, handoff_id), desc.to_json(), pxat=deadline_ms)
            with unavailable_as_typed("writing a handoff descriptor"):
                await pipe.execute()
            return desc
        except BaseException:
            await self._discard(handoff_id, len(sizes))
            raise

    async def _queue_redis_chunks(
        self,
        pipe: Pipeline,
        handoff_id: str,
        chunks: Iterable[bytes],
        deadline_ms: int,
        sizes: list[int],
    ) -> None:
        """Send the chunks in pipelined batches, leaving the last batch queued in `pipe`."""
        with unavailable_as_typed("writing handoff chunks"):
            for c in _checked(chunks):
                if len(pipe) >= PIPELINE_CHUNKS:
                    await pipe.execute()
                pipe.set(chunk_key(self.deployment, handoff_id, len(sizes)), c, pxat=deadline_ms)
                sizes.append(len(c))

    async def _discard(self, handoff_id: str, n_chunks: int) -> None:
        if self.direct_store is not None:
            self.direct_store.release(handoff_id)
        keys = [chunk_key(self.deployment, handoff_id, i) for i in range(n_chunks)]
        keys.append(descriptor_key(self.deployment, handoff_id))
        try:
            await self.client.delete(*keys)
        except UNAVAILABLE_ERRORS:
            log.warning("could not delete %d chunk keys of handoff %s; their lease removes them", n_chunks, handoff_id)


class HandoffReader:
    """The decode side: fetch, verify, and finally release handoffs."""

    def __init__(
        self,
        client: aioredis.Redis,
        deployment: str,
        *,
        http: httpx.AsyncClient | None = None,
        direct_parallelism: int = 4,
    ) -> None:
        self.client = client
        self.deployment = deployment
        self._http = http
        self._parallelism = direct_parallelism

    def key_of(self, handoff_id: str) -> str:
        return descriptor_key(self.deployment, handoff_id)

    async def descriptor(self, key: str) -> Descriptor:
        """The descriptor at `key`; raises HandoffMissing or HandoffCorrupt (or RedisUnavailable)."""
        with unavailable_as_typed("reading a handoff descriptor"):
            raw = await self.client.get(key)
        return self._parse(key, raw)

    async def read(self, key: str, *, model_fingerprint: str, kv_format_version: int) -> Handoff:
        """Fetch and verify the handoff at `key` for an engine with this fingerprint and KV format."""
        # The first chunks travel in the descriptor's round trip: a small handoff costs one round trip, not two.
        # One MGET (every key shares the deployment's hash slot): one reply to parse instead of nine.
        handoff_id = handoff_id_of(key)
        with unavailable_as_typed("reading a handoff"):
            replies: list[Any] = await self.client.mget(
                [key, *(chunk_key(self.deployment, handoff_id, i) for i in range(PIPELINE_CHUNKS))]
            )
        raw, *first = replies
        desc = self._parse(key, raw)
        if desc.model_fingerprint != model_fingerprint or desc.kv_format_version != kv_format_version:
            raise FingerprintMismatch(
                f"handoff {desc.handoff_id} was exported by model {desc.model_fingerprint} format "
                f"{desc.kv_format_version}; this engine is {model_fingerprint} format {kv_format_version}"
            )
        n = len(desc.chunk_sizes)
        if desc.transport == "redis":
            chunks = first[:n] + await self._redis_chunks(desc, start=min(n, PIPELINE_CHUNKS))
        else:
            chunks = await self._direct_chunks(desc)
        for i, (c, size) in enumerate(zip(chunks, desc.chunk_sizes, strict=True)):
            if c is None:
                if time.time() * 1000 >= desc.lease_deadline_ms:
                    raise HandoffExpired(f"handoff {desc.handoff_id}: lease ended before chunk {i} was read")
                raise HandoffCorrupt(f"handoff {desc.handoff_id}: chunk {i} is missing")
            if len(c) != size:
                raise HandoffCorrupt(f"handoff {desc.handoff_id}: chunk {i} has {len(c)} bytes, expected {size}")
        return Handoff(key, desc, b"".join(c for c in chunks if c is not None))

    @staticmethod
    def _parse(key: str, raw: Any) -> Descriptor:
        if raw is None:
            raise HandoffMissing(f"no handoff descriptor at {key} (never written, consumed, or lease expired)")
        desc = Descriptor.from_json(raw)
        if desc.handoff_id != handoff_id_of(key):
            raise HandoffCorrupt(f"descriptor at {key} names handoff {desc.handoff_id}")
        return desc

    async def release(self, desc: Descriptor) -> None:
        """Delete the handoff: the decode worker owns the state now (best effort for `direct`; leases back it up)."""
        keys = [chunk_key(self.deployment, desc.handoff_id, i) for i in range(len(desc.chunk_sizes))]
        with unavailable_as_typed("releasing a handoff"):
            if desc.transport == "redis":
                await self.client.delete(*keys, descriptor_key(self.deployment, desc.handoff_id))
            else:
                await self.client.delete(descriptor_key(self.deployment, desc.handoff_id))
        if desc.transport == "direct" and desc.direct_url:
            try:
                await self._client().delete(f"{desc.direct_url}{DIRECT_PATH}/{desc.handoff_id}")
            except httpx.HTTPError as e:
                log.info("direct release of %s failed (%s); the writer's lease frees it", desc.handoff_id, e)

    async def _redis_chunks(self, desc: Descriptor, start: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        n = len(desc.chunk_sizes)
        with unavailable_as_typed("reading handoff chunks"):
            for batch in range(start, n, PIPELINE_CHUNKS):
                keys = [
                    chunk_key(self.deployment, desc.handoff_id, i)
                    for i in range(batch, min(n, batch + PIPELINE_CHUNKS))
                ]
                got: list[Any] = await self.client.mget(keys)
                out.extend(got)
        return out

    async def _direct_chunks(self, desc: Descriptor) -> list[bytes | None]:
        sem = asyncio.Semaphore(self._parallelism)
        http = self._client()

        async def fetch(i: int) -> bytes | None:
            async with sem:
                try:
                    r = await http.get(f"{desc.direct_url}{DIRECT_PATH}/{desc.handoff_id}/{i}")
                except httpx.HTTPError as e:
                    raise HandoffMissing(f"handoff {desc.handoff_id}: writer {desc.direct_url} unreachable: {e}") from e
                if r.status_code == 404:
                    return None
                if r.status_code != 200:
                    raise HandoffMissing(f"handoff {desc.handoff_id}: writer answered {r.status_code} for chunk {i}")
                return r.content

        return list(await asyncio.gather(*(fetch(i) for i in range(len(desc.chunk_sizes)))))

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
