"""Prefill and decode workers in-process with the real engine on the tiny checkpoint: the prefill streams token 0
and hands over once; a good handoff is imported and released; a corrupt, expired or foreign one is recomputed;
every path gives exactly the reference tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.port import KVMeta, SamplingSpec
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.protocol import contract, keys
from dsv4.protocol.connection import connect
from dsv4.protocol.keys import chunk_key, descriptor_key, handed_over_key
from dsv4.protocol.stats import queue_stats
from dsv4.services.handoff import HandoffReader, HandoffWriter
from dsv4.services.local_redis import LocalRedis
from dsv4.services.token_stream import Finish, TokenChunk, TokenReader, TokenWriter
from dsv4.services.work_queue import Job, WorkQueue
from dsv4.services.workers.decode import DecodeWorker
from dsv4.services.workers.prefill import PrefillWorker
from dsv4.services.workers.runtime import WorkerRuntime
from dsv4.services.workers.settings import WorkerSettings

pytestmark = pytest.mark.integration

DEP = "dw"
PROMPT = [(97 * k + 11) % 120000 + 50 for k in range(20)]
SPEC = SamplingSpec(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return write_checkpoint(tmp_path_factory.mktemp("dw") / "tiny", "tiny-flash", quantized=True, seed=0)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[AsyncEngine]:
    with AsyncEngine.from_path(checkpoint) as e:
        yield e


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> list[int]:
    # Its own engine: the AsyncEngine's thread steps its LLMEngine whenever it has work, so calling into that one from
    # the test's thread would step it from two threads at once.
    return LLMEngine.from_path(checkpoint).generate_ids([PROMPT], SamplingParams.from_spec(SPEC))[0].token_ids


@pytest.fixture
async def worker(redis_server: LocalRedis, engine: AsyncEngine) -> AsyncIterator[WorkerRuntime]:
    settings = WorkerSettings(deployment=DEP, redis_url=redis_server.url, pod_name="dw-1", heartbeat_s=0.2)
    rt = WorkerRuntime(contract.Role.DECODE, settings, engine, keys.DECODE_STREAM)
    task = asyncio.create_task(rt.run(DecodeWorker(rt).handle))
    yield rt
    rt.drain()
    await asyncio.wait_for(task, 30)
    await rt.aclose()


async def handoff_then_decode(rt: WorkerRuntime, engine: AsyncEngine, rid: str, damage: str) -> list[int]:
    out = await engine.prefill(rid, PROMPT, SPEC)
    blob = b"".join(out.kv_chunks)
    meta = out.kv_meta
    if damage == "foreign":
        meta = KVMeta(meta.format_version, "another-model", meta.total_bytes, meta.num_tokens)
    ttl = 0.3 if damage == "expired" else 30
    chunks = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]  # several chunks: damage one in the middle
    desc = await HandoffWriter(rt.client, DEP, ttl_s=ttl).write(rid, meta, chunks, out.first_token)
    if damage == "corrupt":
        key = chunk_key(DEP, desc.handoff_id, 1)
        data = bytearray(await rt.client.get(key) or b"")
        data[7] ^= 0xFF
        await rt.client.set(key, bytes(data), keepttl=True)
    if damage == "expired":
        await asyncio.sleep(0.5)
    await TokenWriter(rt.client, DEP, rid).write(0, [out.first_token])  # as the prefill worker does
    job = Job(rid, tuple(PROMPT), SPEC, handoff_key=descriptor_key(DEP, desc.handoff_id))
    await WorkQueue(rt.client, DEP, keys.DECODE_STREAM).enqueue(job)
    tokens: list[int] = []
    async for ev in TokenReader(rt.client, DEP, rid).events(idle_timeout_s=30):
        if isinstance(ev, TokenChunk):
            tokens.extend(ev.token_ids)
        else:
            assert isinstance(ev, Finish) and ev.reason == "length" and ev.usage.completion_tokens == len(tokens)
    return tokens


@pytest.mark.parametrize("damage", ["none", "corrupt", "expired", "foreign"])
async def test_handoff_is_imported_or_recomputed_to_the_same_tokens(
    worker: WorkerRuntime, engine: AsyncEngine, expected: list[int], damage: str
) -> None:
    refused = REGISTRY.get_sample_value("dsv4_handoff_failures_total", {"reason": "KVImportError"}) or 0.0
    assert await handoff_then_decode(worker, engine, f"r-{damage}", damage) == expected
    if damage == "corrupt":  # a changed byte passes the handoff (sizes) and is refused by the KV format's crc32c
        assert REGISTRY.get_sample_value("dsv4_handoff_failures_total", {"reason": "KVImportError"}) == refused + 1
    stats = await queue_stats(worker.client, DEP, keys.DECODE_STREAM)
    for _ in range(50):  # the ack follows the end marker
        if stats.pending == 0:
            break
        await asyncio.sleep(0.05)
        stats = await queue_stats(worker.client, DEP, keys.DECODE_STREAM)
    assert (stats.length, stats.pending) == (0, 0)
    leftover = [k async for k in worker.client.scan_iter(match=f"dsv4:{{{DEP}}}:kv:*")]
    assert leftover == [] or damage in ("corrupt", "foreign")  # unusable handoffs are left to their lease


async def test_local_prefill_job(worker: WorkerRuntime, expected: list[int]) -> None:
    await WorkQueue(worker.client, DEP, keys.DECODE_STREAM).enqueue(Job("local", tuple(PROMPT), SPEC))
    tokens = [
        t
        async for ev in TokenReader(worker.client, DEP, "local").events(idle_timeout_s=30)
        if isinstance(ev, TokenChunk)
        for t in ev.token_ids
    ]
    assert tokens == expected


async def test_drain_finishes_in_flight_work_then_leaves_the_group(
    redis_server: LocalRedis, engine: AsyncEngine, expected: list[int]
) -> None:
    settings = WorkerSettings(deployment=DEP, redis_url=redis_server.url, pod_name="dw-drain", heartbeat_s=0.2)
    rt = WorkerRuntime(contract.Role.DECODE, settings, engine, keys.DECODE_STREAM)
    task = asyncio.create_task(rt.run(DecodeWorker(rt).handle))
    client = connect(redis_server.url)
    await WorkQueue(client, DEP, keys.DECODE_STREAM).enqueue(Job("drained", tuple(PROMPT), SPEC))
    tokens: list[int] = []
    async for ev in TokenReader(client, DEP, "drained").events(idle_timeout_s=30):
        if isinstance(ev, TokenChunk):
            tokens.extend(ev.token_ids)
            rt.drain()  # SIGTERM arrives mid-request: no new work, but this request completes
    assert tokens == expected
    await asyncio.wait_for(task, 30)
    assert (await queue_stats(client, DEP, keys.DECODE_STREAM)).consumers == 0
    await WorkQueue(client, DEP, keys.DECODE_STREAM).enqueue(Job("after", tuple(PROMPT), SPEC))
    await asyncio.sleep(0.5)
    assert (await queue_stats(client, DEP, keys.DECODE_STREAM)).lag == 1  # nobody took it
    await rt.aclose()
    await client.aclose()


async def test_prefill_streams_token_zero_hands_over_once(
    redis_server: LocalRedis, engine: AsyncEngine, expected: list[int]
) -> None:
    settings = WorkerSettings(deployment=DEP, redis_url=redis_server.url, pod_name="pf-1", heartbeat_s=0.2)
    rt = WorkerRuntime(contract.Role.PREFILL, settings, engine, keys.PREFILL_STREAM)
    worker = PrefillWorker(rt)
    task = asyncio.create_task(rt.run(worker.handle))
    client = connect(redis_server.url)
    trace = {"traceparent": "00-" + "5" * 32 + "-" + "6" * 16 + "-01"}
    await WorkQueue(client, DEP, keys.PREFILL_STREAM).enqueue(Job("p1", tuple(PROMPT), SPEC, trace_context=trace))
    decode = WorkQueue(client, DEP, keys.DECODE_STREAM, consumer="test")
    await decode.ensure_group()
    deliveries = []
    for _ in range(100):
        deliveries = await decode.read(block_ms=200)
        if deliveries:
            break
    [d] = deliveries
    assert d.job.request_id == "p1" and d.job.handoff_key and d.job.prompt_ids == tuple(PROMPT)
    assert d.job.trace_context["traceparent"].startswith("00-" + "5" * 32)  # same trace, new parent span
    assert await TokenWriter(client, DEP, "p1").streamed() == expected[:1]
    h = await HandoffReader(client, DEP).read(
        d.job.handoff_key, model_fingerprint=engine.model_fingerprint, kv_format_version=engine.kv_format_version
    )
    assert h.descriptor.first_token == expected[0] and h.descriptor.num_tokens == len(PROMPT)
    assert await client.exists(handed_over_key(DEP, "p1"))
    rt.drain()
    await asyncio.wait_for(task, 30)
    stats = await queue_stats(client, DEP, keys.PREFILL_STREAM)
    assert (stats.length, stats.pending) == (0, 0)
    await rt.aclose()
    await client.aclose()


async def test_a_decode_worker_with_mtp_drafts_after_the_handoff(redis_server: LocalRedis, checkpoint: Path) -> None:
    """`engine.speculativeMtp` on both workers: the prefill's blob carries the MTP layers' state and its draft, the
    decode worker imports it and verifies a draft from its first decode step on (the random MTP's drafts are
    rejected: its counters move, on /metrics too), and the tokens are plain decoding's."""
    config = WorkerSettings(engine={"speculative_mtp": True}).engine_config()
    expected = LLMEngine.from_path(checkpoint).generate_ids([PROMPT], SamplingParams.from_spec(SPEC))[0].token_ids
    with AsyncEngine.from_path(checkpoint, config=config) as mtp_engine:
        settings = WorkerSettings(deployment=DEP, redis_url=redis_server.url, pod_name="dw-mtp", heartbeat_s=0.2)
        rt = WorkerRuntime(contract.Role.DECODE, settings, mtp_engine, keys.DECODE_STREAM)
        task = asyncio.create_task(rt.run(DecodeWorker(rt).handle))
        assert await handoff_then_decode(rt, mtp_engine, "r-mtp", "none") == expected
        extra = mtp_engine.stats().extra
        # every decode step verifies a draft, the first the one the blob carried; each gives one or two tokens
        assert extra["mtp_drafts_proposed"] >= (len(expected) - 1) / 2
        # the prompt once (imported, not recomputed) and token 0, which the decode computes as a streamed token
        assert extra["prefill_tokens"] == len(PROMPT) + 1
        for _ in range(50):  # the heartbeat exports the engine's counters to /metrics
            drafts = REGISTRY.get_sample_value("dsv4_mtp_draft_tokens_total", {"role": "decode"})
            if drafts == extra["mtp_drafts_proposed"]:
                break
            await asyncio.sleep(0.05)
        assert drafts == extra["mtp_drafts_proposed"]
        accepted = REGISTRY.get_sample_value("dsv4_mtp_accepted_tokens_total", {"role": "decode"})
        assert accepted == extra["mtp_drafts_accepted"]
        rt.drain()
        await asyncio.wait_for(task, 30)
        await rt.aclose()
