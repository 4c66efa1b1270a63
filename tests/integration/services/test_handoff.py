"""KV handoff against a real redis-server (and a real HTTP server for the direct data plane)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.model_runtime.engine.port import KVMeta
from dsv4.protocol.connection import RedisUnavailable, connect
from dsv4.services.handoff import (
    FingerprintMismatch,
    HandoffCorrupt,
    HandoffExpired,
    HandoffMissing,
    HandoffReader,
    HandoffWriter,
    chunk_key,
    descriptor_key,
)
from dsv4.services.kv_direct import DirectStore, direct_router
from dsv4.services.local_redis import LocalRedis, free_port

pytestmark = pytest.mark.integration

DEP = "t"
FP = "model-fp-1"
TRACE = {"traceparent": "00-" + "3" * 32 + "-" + "4" * 16 + "-01"}


def meta(n: int) -> KVMeta:
    return KVMeta(format_version=1, model_fingerprint=FP, total_bytes=n, num_tokens=11)


def parts(blob: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(blob), size):
        yield blob[i : i + size]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator:  # type: ignore[type-arg]
    c = connect(redis_url)
    yield c
    await c.aclose()


@pytest.mark.parametrize(("size", "engine_part"), [(1, 1), (5 << 20, 1 << 20), ((9 << 20) + 3, 3 << 20)])
async def test_round_trip_verifies_and_release_deletes_every_key(client, size: int, engine_part: int) -> None:  # type: ignore[no-untyped-def]
    blob = os.urandom(size)
    writer = HandoffWriter(client, DEP, ttl_s=30)
    desc = await writer.write("req1", meta(size), parts(blob, engine_part), first_token=42, trace_context=TRACE)
    assert all(s <= 4 << 20 for s in desc.chunk_sizes) and sum(desc.chunk_sizes) == size
    assert (desc.first_token, desc.num_tokens, dict(desc.trace_context)) == (42, 11, TRACE)
    key = descriptor_key(DEP, desc.handoff_id)
    assert 0 < await client.ttl(key) <= 30 and 0 < await client.ttl(chunk_key(DEP, desc.handoff_id, 0)) <= 30
    reader = HandoffReader(client, DEP)
    got = await reader.read(key, model_fingerprint=FP, kv_format_version=1)
    assert got.blob == blob and got.descriptor == desc
    await reader.release(got.descriptor)
    assert await client.dbsize() == 0
    with pytest.raises(HandoffMissing):
        await reader.read(key, model_fingerprint=FP, kv_format_version=1)


async def test_each_write_uses_fresh_keys(client) -> None:  # type: ignore[no-untyped-def]
    writer = HandoffWriter(client, DEP)
    a = await writer.write("same", meta(3), [b"abc"], first_token=1)
    b = await writer.write("same", meta(3), [b"xyz"], first_token=1)
    assert a.handoff_id != b.handoff_id
    got = await HandoffReader(client, DEP).read(
        descriptor_key(DEP, a.handoff_id), model_fingerprint=FP, kv_format_version=1
    )
    assert got.blob == b"abc"


async def test_fingerprint_or_format_mismatch(client) -> None:  # type: ignore[no-untyped-def]
    desc = await HandoffWriter(client, DEP).write("r", meta(3), [b"abc"], first_token=1)
    reader = HandoffReader(client, DEP)
    with pytest.raises(FingerprintMismatch):
        await reader.read(descriptor_key(DEP, desc.handoff_id), model_fingerprint="other", kv_format_version=1)
    with pytest.raises(FingerprintMismatch):
        await reader.read(descriptor_key(DEP, desc.handoff_id), model_fingerprint=FP, kv_format_version=2)


async def test_lease_expiry(client) -> None:  # type: ignore[no-untyped-def]
    writer = HandoffWriter(client, DEP, ttl_s=0.4)
    gone = await writer.write("r", meta(6), [b"abc", b"def"], first_token=1)
    skewed = await writer.write("s", meta(6), [b"abc", b"def"], first_token=1)
    await client.persist(descriptor_key(DEP, skewed.handoff_id))  # descriptor outlives its chunks
    await asyncio.sleep(0.6)
    reader = HandoffReader(client, DEP)
    with pytest.raises(HandoffMissing):
        await reader.read(descriptor_key(DEP, gone.handoff_id), model_fingerprint=FP, kv_format_version=1)
    with pytest.raises(HandoffExpired):
        await reader.read(descriptor_key(DEP, skewed.handoff_id), model_fingerprint=FP, kv_format_version=1)


async def test_failing_export_leaves_nothing_behind(client) -> None:  # type: ignore[no-untyped-def]
    def exploding() -> Iterator[bytes]:
        for _ in range(20):
            yield os.urandom(1 << 20)
        raise RuntimeError("export failed")

    writer = HandoffWriter(client, DEP)
    with pytest.raises(RuntimeError, match="export failed"):
        await writer.write("r", meta(30 << 20), exploding(), first_token=1)
    with pytest.raises(ValueError, match="metadata says"):
        await writer.write("r", meta(10), [b"short"], first_token=1)
    with pytest.raises(ValueError, match="exceeds the handoff"):  # one chunk is one Redis value of at most 4 MiB
        await writer.write("r", meta((6 << 20) + 1), [b"x", os.urandom(6 << 20)], first_token=1)
    assert await client.dbsize() == 0


def _corrupt_cases() -> st.SearchStrategy[tuple[str, int, int]]:
    return st.tuples(st.sampled_from(["truncate", "extend", "delete"]), st.integers(0, 2), st.integers(0, 10_000))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_corrupt_cases())
def test_any_missing_or_resized_chunk_is_detected(redis_url: str, case: tuple[str, int, int]) -> None:
    """What the handoff owns: every chunk there, at its size. A changed byte is the KV format's to catch (crc32c
    of every chunk, checked at import: test_kv_export.py, and the decode worker's recompute: test_workers.py)."""
    how, which, pos = case
    blob = os.urandom(3 * 4096 - 100)
    sync = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        c = connect(redis_url)
        try:
            desc = await HandoffWriter(c, DEP).write("r", meta(len(blob)), parts(blob, 4096), first_token=1)
            ck = chunk_key(DEP, desc.handoff_id, which)
            data = bytearray(sync.get(ck) or b"")
            p = pos % len(data)
            if how == "truncate":
                sync.set(ck, bytes(data[:p]), keepttl=True)
            elif how == "extend":
                sync.set(ck, bytes(data) + b"\0", keepttl=True)
            else:
                sync.delete(ck)
            with pytest.raises(HandoffCorrupt):
                await HandoffReader(c, DEP).read(
                    descriptor_key(DEP, desc.handoff_id), model_fingerprint=FP, kv_format_version=1
                )
        finally:
            await c.aclose()

    asyncio.run(scenario())
    sync.close()


async def test_redis_killed_during_write_is_typed_and_leaves_no_half_handoff(redis_server: LocalRedis) -> None:
    c = connect(redis_server.url)
    writer = HandoffWriter(c, DEP)
    chunks_sent = 0

    def slow_export() -> Iterator[bytes]:
        nonlocal chunks_sent
        for _ in range(64):
            chunks_sent += 1
            if chunks_sent == 20:
                redis_server.kill()
            yield os.urandom(1 << 20)

    with pytest.raises(RedisUnavailable):
        await writer.write("r", meta(64 << 20), slow_export(), first_token=1)
    with pytest.raises(RedisUnavailable):
        await HandoffReader(c, DEP).read(descriptor_key(DEP, "r.x"), model_fingerprint=FP, kv_format_version=1)
    redis_server.start()
    assert await c.keys("*") == []
    desc = await writer.write("r", meta(3), [b"abc"], first_token=1)  # the same client recovers
    got = await HandoffReader(c, DEP).read(
        descriptor_key(DEP, desc.handoff_id), model_fingerprint=FP, kv_format_version=1
    )
    assert got.blob == b"abc"
    await c.aclose()


@contextlib.asynccontextmanager
async def serve(app: FastAPI, port: int) -> AsyncIterator[uvicorn.Server]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


async def test_direct_data_plane_keeps_only_the_descriptor_in_redis(client) -> None:  # type: ignore[no-untyped-def]
    store = DirectStore()
    app = FastAPI()
    app.include_router(direct_router(store))
    port = free_port()
    blob = os.urandom((6 << 20) + 17)
    async with serve(app, port):
        writer = HandoffWriter(
            client, DEP, transport="direct", direct_store=store, direct_url=f"http://127.0.0.1:{port}"
        )
        desc = await writer.write("d", meta(len(blob)), parts(blob, 1 << 20), first_token=9, trace_context=TRACE)
        assert [k.decode() for k in await client.keys("*")] == [descriptor_key(DEP, desc.handoff_id)]
        reader = HandoffReader(client, DEP)
        got = await reader.read(descriptor_key(DEP, desc.handoff_id), model_fingerprint=FP, kv_format_version=1)
        assert got.blob == blob and got.descriptor.transport == "direct"
        await reader.release(got.descriptor)
        assert store.bytes_held == 0 and await client.dbsize() == 0
        again = await writer.write("d2", meta(3), [b"abc"], first_token=9)
    with pytest.raises(HandoffMissing, match="unreachable"):
        await reader.read(descriptor_key(DEP, again.handoff_id), model_fingerprint=FP, kv_format_version=1)
    await reader.aclose()
