"""The queue protocol against a real redis-server: delivery, ack, reclaim, stats, token streams, Redis down."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator

import pytest

from dsv4.model_runtime.engine.port import SamplingSpec, TokenLogprobs
from dsv4.protocol import keys
from dsv4.protocol.connection import RedisUnavailable, connect
from dsv4.protocol.keys import dead_letter_key, token_stream_key
from dsv4.protocol.stats import queue_stats
from dsv4.services.local_redis import LocalRedis
from dsv4.services.stream_entries import MalformedEntry, pack_ids
from dsv4.services.token_stream import (
    Finish,
    RequestLost,
    TokenChunk,
    TokenReader,
    TokenStreamFailed,
    TokenStreamGap,
    TokenStreamTimeout,
    TokenWriter,
    Usage,
    is_cancelled,
    request_cancel,
)
from dsv4.services.work_queue import Delivery, Job, WorkQueue

pytestmark = pytest.mark.integration

DEP = "test"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator:  # type: ignore[type-arg]
    c = connect(redis_url)
    yield c
    await c.aclose()


def job(rid: str) -> Job:
    trace = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    return Job(rid, (1, 2, 3), SamplingSpec(max_tokens=4), trace_context=trace)


async def test_enqueue_read_ack_and_stats(client) -> None:  # type: ignore[no-untyped-def]
    producer = WorkQueue(client, DEP, keys.PREFILL_STREAM)
    worker = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="w1")
    assert (await queue_stats(client, DEP, keys.PREFILL_STREAM)).lag == 0
    await producer.enqueue(job("a"))
    await producer.enqueue(job("b"))
    stats = await queue_stats(client, DEP, keys.PREFILL_STREAM)
    assert (stats.length, stats.lag, stats.pending, stats.consumers) == (2, 2, 0, 0)
    await worker.ensure_group()
    await worker.ensure_group()  # idempotent
    got = await worker.read(count=1)
    assert [d.job.request_id for d in got] == ["a"]
    assert (got[0].job.prompt_ids, got[0].job.sampling) == ((1, 2, 3), SamplingSpec(max_tokens=4))
    assert not got[0].reclaimed
    assert got[0].job.trace_context["traceparent"].startswith("00-111")
    stats = await queue_stats(client, DEP, keys.PREFILL_STREAM)
    assert (stats.lag, stats.pending, stats.consumers) == (1, 1, 1)
    assert stats.oldest_waiting_age_s >= 0
    await worker.ack(got[0])
    stats = await queue_stats(client, DEP, keys.PREFILL_STREAM)
    assert (stats.length, stats.lag, stats.pending) == (1, 1, 0)
    [b] = await worker.read(count=5)
    assert b.job.request_id == "b"
    await worker.ack(b)
    stats = await queue_stats(client, DEP, keys.PREFILL_STREAM)  # an empty stream still has its workers
    assert (stats.length, stats.lag, stats.pending, stats.consumers) == (0, 0, 0, 1)
    assert await worker.read(count=5, block_ms=50) == []
    assert await worker.leave()
    assert (await queue_stats(client, DEP, keys.PREFILL_STREAM)).consumers == 0


async def test_consumer_counts_from_registration_and_leave_keeps_busy_ones(client) -> None:  # type: ignore[no-untyped-def]
    busy = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="busy")
    await busy.ensure_group()
    assert (await queue_stats(client, DEP, keys.DECODE_STREAM)).consumers == 1  # before any read
    await busy.enqueue(job("j"))
    [d] = await busy.read()
    assert not await busy.leave()  # it still holds a job: leaving would orphan it from XPENDING by consumer
    await busy.ack(d)
    assert await busy.leave()


async def test_dead_worker_job_is_reclaimed_but_touched_job_is_not(client) -> None:  # type: ignore[no-untyped-def]
    dead = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="dead")
    alive = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="alive")
    rescuer = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="rescuer")
    await dead.ensure_group()
    await dead.enqueue(job("orphan"))
    await dead.enqueue(job("busy"))
    [orphan] = await dead.read(count=1)
    [busy] = await alive.read(count=1)
    assert await rescuer.reclaim(min_idle_ms=10_000) == []
    await asyncio.sleep(0.3)
    await alive.touch([busy])
    taken = await rescuer.reclaim(min_idle_ms=200)
    assert [(d.job.request_id, d.reclaimed) for d in taken] == [("orphan", True)]
    assert taken[0].entry_id == orphan.entry_id
    await rescuer.ack(orphan)
    stats = await queue_stats(client, DEP, keys.DECODE_STREAM)
    assert (stats.length, stats.pending) == (1, 1)


async def test_malformed_entry_goes_to_dead_letter_and_is_not_redelivered(client) -> None:  # type: ignore[no-untyped-def]
    q = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="w")
    await q.ensure_group()
    await client.xadd(q.key, {b"v": b"1", b"rid": b"x"})  # no prompt, no sampling
    await q.enqueue(job("good"))
    got = await q.read(count=10)
    assert [d.job.request_id for d in got] == ["good"]
    dead = await client.xrange(dead_letter_key(DEP, keys.PREFILL_STREAM))
    assert len(dead) == 1 and b"dead_reason" in dead[0][1] and dead[0][1][b"rid"] == b"x"
    assert (await queue_stats(client, DEP, keys.PREFILL_STREAM)).pending == 1


async def test_token_stream_drops_duplicates_and_ends_with_usage(client) -> None:  # type: ignore[no-untyped-def]
    w = TokenWriter(client, DEP, "r")
    await w.write(0, [10])
    await w.write(1, [11, 12])
    await w.write(1, [11, 12])  # a worker that took over rewrites what it cannot know was sent
    await w.write(2, [12, 13])  # overlaps: only 13 is new
    await w.finish("stop", Usage(5, 4))
    assert await w.streamed() == [10, 11, 12, 13]
    reader = TokenReader(client, DEP, "r")
    events = [e async for e in reader.events(idle_timeout_s=2)]
    assert events == [
        TokenChunk(0, (10,)),
        TokenChunk(1, (11, 12)),
        TokenChunk(3, (13,)),
        Finish("stop", Usage(5, 4)),
    ]
    assert events[-1].usage.total_tokens == 9  # type: ignore[union-attr]
    await reader.close()
    assert not await client.exists(reader.key)


async def test_token_stream_carries_logprobs_through_rewrites(client) -> None:  # type: ignore[no-untyped-def]
    lp = [TokenLogprobs(-0.5 * i, ((i, -0.5 * i), (i + 1, -9.0))) for i in range(4)]
    w = TokenWriter(client, DEP, "lp")
    await w.write(0, [10, 11], lp[:2])
    await w.write(1, [11, 12, 13], lp[1:])  # overlaps token 1: only 12 and 13 are new, with their own logprobs
    await w.write(4, [14], [None])  # a token whose logprobs are unknown travels without
    await w.finish("length", Usage(1, 5))
    events = [e async for e in TokenReader(client, DEP, "lp").events(idle_timeout_s=2)]
    assert events[:3] == [TokenChunk(0, (10, 11), tuple(lp[:2])), TokenChunk(2, (12, 13), tuple(lp[2:])),
                          TokenChunk(4, (14,), None)]  # fmt: skip
    await client.xadd(token_stream_key(DEP, "bad-lp"), {b"i": b"0", b"ids": pack_ids([1, 2]), b"lp": b"[[0.1,[]]]"})
    with pytest.raises(MalformedEntry, match="1 token logprobs for 2 tokens"):
        _ = [e async for e in TokenReader(client, DEP, "bad-lp").events(idle_timeout_s=2)]


async def test_token_stream_reads_while_written(client) -> None:  # type: ignore[no-untyped-def]
    w = TokenWriter(client, DEP, "live")

    async def produce() -> None:
        for i in range(5):
            await asyncio.sleep(0.02)
            await w.write(i, [100 + i])
        await w.finish("length", Usage(1, 5))

    task = asyncio.create_task(produce())
    got = [e async for e in TokenReader(client, DEP, "live").events(idle_timeout_s=2)]
    await task
    assert [t for e in got if isinstance(e, TokenChunk) for t in e.token_ids] == [100, 101, 102, 103, 104]


async def test_token_stream_gap_error_and_timeout(client) -> None:  # type: ignore[no-untyped-def]
    w = TokenWriter(client, DEP, "gap")
    await w.write(0, [1])
    await w.write(2, [3])
    with pytest.raises(TokenStreamGap):
        _ = [e async for e in TokenReader(client, DEP, "gap").events(idle_timeout_s=2)]

    w2 = TokenWriter(client, DEP, "short")
    await w2.write(0, [1])
    await w2.finish("stop", Usage(1, 2))
    with pytest.raises(TokenStreamGap):
        _ = [e async for e in TokenReader(client, DEP, "short").events(idle_timeout_s=2)]

    w3 = TokenWriter(client, DEP, "err")
    await w3.fail("engine exploded", "engine_error")
    with pytest.raises(TokenStreamFailed) as e:
        _ = [e async for e in TokenReader(client, DEP, "err").events(idle_timeout_s=2)]
    assert e.value.code == "engine_error"

    t0 = time.monotonic()
    with pytest.raises(TokenStreamTimeout):
        _ = [e async for e in TokenReader(client, DEP, "nobody").events(idle_timeout_s=0.3)]
    assert time.monotonic() - t0 < 2


async def _leased(client, rid: str) -> TokenReader:  # type: ignore[no-untyped-def]
    """A reader holding its request's lease, taken in the transaction that enqueues the job (as the gateway does)."""
    reader = TokenReader(client, DEP, rid)
    async with client.pipeline(transaction=True) as p:
        reader.take_lease(p)
        WorkQueue(client, DEP, keys.DECODE_STREAM).enqueue_in(p, job(rid))
        await p.execute()
    return reader


async def test_a_leased_request_is_read_to_the_end_and_closing_frees_the_lease(client) -> None:  # type: ignore[no-untyped-def]
    reader = await _leased(client, "leased")
    assert await client.ttl(reader.lease_key) > 0
    w = TokenWriter(client, DEP, "leased")

    async def produce() -> None:
        await asyncio.sleep(1.3)  # past one empty read: the lease is renewed, not mistaken for lost
        await w.write(0, [7])
        await w.finish("length", Usage(3, 1))

    task = asyncio.create_task(produce())
    got = [e async for e in reader.events(idle_timeout_s=5)]
    await task
    assert isinstance(got[-1], Finish) and [e.token_ids for e in got if isinstance(e, TokenChunk)] == [(7,)]
    await reader.close()
    assert not await client.exists(reader.lease_key, reader.key)


async def test_a_request_redis_lost_in_a_restart_is_reported_within_seconds(redis_server: LocalRedis) -> None:
    """A broker restarted empty while a request waits: the reader says so at its next empty read, not after the
    idle timeout, and a writer that carries on after the restart (a gap) gets the same verdict."""
    client = connect(redis_server.url)
    waiting = await _leased(client, "waiting")
    streaming = await _leased(client, "streaming")
    w = TokenWriter(client, DEP, "streaming")
    await w.write(0, [1])
    events = streaming.events(idle_timeout_s=60)
    assert isinstance(await anext(events), TokenChunk)
    redis_server.kill()
    redis_server.start()  # persistence is off: jobs, tokens and leases are gone
    await w.write(5, [6])  # a writer carrying on on the fresh broker: index 5 without 1..4
    t0 = time.monotonic()
    with pytest.raises(RequestLost):
        _ = [e async for e in waiting.events(idle_timeout_s=60)]
    with pytest.raises(RequestLost):
        await anext(events)
    assert time.monotonic() - t0 < 10
    await client.aclose()


async def test_token_stream_has_a_ttl(client) -> None:  # type: ignore[no-untyped-def]
    w = TokenWriter(client, DEP, "ttl", ttl_s=30)
    await w.write(0, [1])
    assert 0 < await client.ttl(w.key) <= 30


async def test_concurrent_token_writers_share_round_trips_and_keep_order(client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A decode worker writes one token per request per step: those writes coalesce into shared pipelines."""
    executed: list[int] = []
    real_pipeline = client.pipeline

    def counting_pipeline(*args, **kwargs):  # type: ignore[no-untyped-def]
        p = real_pipeline(*args, **kwargs)
        real_execute = p.execute

        async def execute(*a, **k):  # type: ignore[no-untyped-def]
            executed.append(len(p.command_stack))
            return await real_execute(*a, **k)

        p.execute = execute
        return p

    monkeypatch.setattr(client, "pipeline", counting_pipeline)
    writers = [TokenWriter(client, DEP, f"co{r}") for r in range(16)]

    async def stream(r: int) -> None:
        for i in range(8):
            await writers[r].write(i, [r * 100 + i])
        await writers[r].finish("length", Usage(1, 8))

    await asyncio.gather(*(stream(r) for r in range(16)))
    assert len(executed) < 16 * 9 / 4, f"{len(executed)} pipelines for {16 * 9} writes"
    for r in range(16):
        events = [e async for e in TokenReader(client, DEP, f"co{r}").events(idle_timeout_s=2)]
        assert [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids] == [r * 100 + i for i in range(8)]
        assert events[-1] == Finish("length", Usage(1, 8))


async def test_a_closed_client_is_not_kept_alive_by_its_token_writes(redis_url: str) -> None:
    c = connect(redis_url)
    await TokenWriter(c, DEP, "gc").write(0, [1])
    await c.aclose()
    ref = weakref.ref(c)
    del c
    gc.collect()
    assert ref() is None


async def test_token_writers_waiting_on_a_dead_redis_all_get_the_typed_error(redis_server: LocalRedis) -> None:
    client = connect(redis_server.url)
    await TokenWriter(client, DEP, "warm").write(0, [1])
    redis_server.kill()
    results = await asyncio.gather(
        *(TokenWriter(client, DEP, f"down{r}").write(0, [r]) for r in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RedisUnavailable) for r in results), results
    redis_server.start()
    w = TokenWriter(client, DEP, "back")
    await w.write(0, [7])
    assert await w.streamed() == [7]
    await client.aclose()


async def test_cancel_flag(client) -> None:  # type: ignore[no-untyped-def]
    assert not await is_cancelled(client, DEP, "c")
    await request_cancel(client, DEP, "c")
    assert await is_cancelled(client, DEP, "c")


async def test_redis_down_is_a_typed_error_within_seconds(redis_server: LocalRedis) -> None:
    client = connect(redis_server.url)
    q = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="w")
    await q.ensure_group()
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable):
        await q.enqueue(job("lost"))
    with pytest.raises(RedisUnavailable):
        await queue_stats(client, DEP, keys.PREFILL_STREAM)
    assert time.monotonic() - t0 < 10
    redis_server.start()
    await q.ensure_group()
    await q.enqueue(job("after"))
    assert [d.job.request_id for d in await q.read()] == ["after"]
    await client.aclose()


async def test_consumer_group_lost_with_a_redis_restart_is_recreated(redis_server: LocalRedis) -> None:
    client = connect(redis_server.url)
    q = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="w")
    await q.ensure_group()
    redis_server.kill()
    redis_server.start()  # persistence is off: stream and group are gone
    await q.touch([Delivery(q.key, "1-0", job("gone"))])
    assert await q.reclaim(min_idle_ms=0) == []
    assert await q.read(block_ms=0) == []
    await q.enqueue(job("fresh"))
    assert [d.job.request_id for d in await q.read()] == ["fresh"]
    await client.aclose()


async def test_a_job_for_a_worker_goes_to_that_worker(client) -> None:  # type: ignore[no-untyped-def]
    producer = WorkQueue(client, DEP, keys.PREFILL_STREAM)
    a = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="a")
    b = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="b")
    await a.ensure_group()
    await b.ensure_group()
    await producer.enqueue(job("for-a"), to="a")
    await producer.enqueue(job("anyone"))
    assert [d.job.request_id for d in await b.read(count=5, block_ms=50)] == ["anyone"]
    [mine] = await a.read(count=5, block_ms=50)
    assert mine.job.request_id == "for-a" and mine.stream_key == a.own_key
    await a.ack(mine)
    assert await client.xlen(a.own_key) == 0


async def test_a_dead_workers_own_stream_is_taken_over(client) -> None:  # type: ignore[no-untyped-def]
    producer = WorkQueue(client, DEP, keys.PREFILL_STREAM)
    dead = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="dead")
    rescuer = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="rescuer")
    await dead.ensure_group()
    await rescuer.ensure_group()
    await dead.heartbeat(ttl_ms=300)
    await producer.enqueue(job("started"), to="dead")
    [started] = await dead.read(count=1, block_ms=50)  # it took this one, then died
    assert started.stream_key == dead.own_key
    await producer.enqueue(job("unread"), to="dead")
    assert await rescuer.reclaim(min_idle_ms=5_000) == [], "a worker whose heartbeat holds is alive"
    await asyncio.sleep(0.4)  # its heartbeat lapses
    taken = await rescuer.reclaim(min_idle_ms=200)
    assert sorted((d.job.request_id, d.reclaimed) for d in taken) == [("started", True), ("unread", True)]
    for d in taken:
        await rescuer.ack(d)
    assert await rescuer.reclaim(min_idle_ms=200) == []  # the empty stream of the dead worker is forgotten
    assert not await client.exists(dead.own_key)
    assert await client.smembers(keys.workers_key(DEP, keys.PREFILL_STREAM)) == {b"rescuer"}


async def test_a_busy_worker_that_does_not_read_keeps_its_stream(client) -> None:  # type: ignore[no-untyped-def]
    producer = WorkQueue(client, DEP, keys.PREFILL_STREAM)
    busy = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="busy")
    other = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="other")
    await busy.ensure_group()
    await other.ensure_group()
    await busy.heartbeat(ttl_ms=10_000)
    await producer.enqueue(job("waits-for-busy"), to="busy")
    await asyncio.sleep(0.3)  # longer than the takeover time below, and busy has not read since it registered
    assert await other.reclaim(min_idle_ms=200) == []
    assert [d.job.request_id for d in await busy.read(count=1, block_ms=50)] == ["waits-for-busy"]


async def test_an_idle_worker_that_heartbeats_keeps_its_own_stream(client) -> None:  # type: ignore[no-untyped-def]
    """Redis 7.0 counts a consumer waiting on an empty stream as idle: the heartbeat key tells it is alive."""
    idle = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="idle")
    peer = WorkQueue(client, DEP, keys.PREFILL_STREAM, consumer="peer")
    await idle.ensure_group()
    await peer.ensure_group()
    await idle.heartbeat(ttl_ms=600)
    reader = asyncio.create_task(idle.read(count=1, block_ms=1000))  # waits on its empty streams
    await asyncio.sleep(0.4)
    assert await peer.reclaim(min_idle_ms=200) == []
    assert await client.exists(idle.own_key), "a live worker's stream is left alone"
    await WorkQueue(client, DEP, keys.PREFILL_STREAM).enqueue(job("routed"), to="idle")
    [got] = await asyncio.wait_for(reader, 5)
    assert got.job.request_id == "routed"
    await idle.ack(got)
    await asyncio.sleep(0.7)  # the heartbeat expired: now it counts as dead
    assert await peer.reclaim(min_idle_ms=200) == []  # nothing unread there, and its empty stream goes
    assert not await client.exists(idle.own_key)


async def test_a_stream_deleted_under_a_waiting_worker_is_recreated(client) -> None:  # type: ignore[no-untyped-def]
    """A peer that took the worker for dead deletes its empty stream while it waits on it: the read recovers."""
    worker = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="w")
    await worker.ensure_group()
    reader = asyncio.create_task(worker.read(count=1, block_ms=1000))
    await asyncio.sleep(0.2)
    await client.delete(worker.own_key)
    assert await asyncio.wait_for(reader, 5) == []
    await WorkQueue(client, DEP, keys.DECODE_STREAM).enqueue(job("after"), to="w")
    [got] = await worker.read(count=1, block_ms=500)
    assert got.job.request_id == "after"


async def test_a_worker_that_leaves_hands_its_unread_jobs_back(client) -> None:  # type: ignore[no-untyped-def]
    producer = WorkQueue(client, DEP, keys.DECODE_STREAM)
    leaving = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="leaving")
    other = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="other")
    await leaving.ensure_group()
    await other.ensure_group()
    await producer.enqueue(job("routed-late"), to="leaving")
    assert await leaving.leave()
    assert not await client.exists(leaving.own_key)
    assert [d.job.request_id for d in await other.read(count=5, block_ms=50)] == ["routed-late"]
