"""The async engine through the workers' Protocol: prefill + export in one engine, import + decode in another."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.port import Engine, KVImportError, SamplingSpec, TokenOutput
from dsv4.model_runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

PROMPT = [(53 * k + 7) % 128000 for k in range(19)]
GREEDY = SamplingSpec(max_tokens=7, temperature=0.0, ignore_eos=True)
SEEDED = SamplingSpec(max_tokens=7, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True, logprobs=2)


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["sync", "overlapped", "overlapped-mtp"])
def engines(
    request: pytest.FixtureRequest, make_engine: Callable[..., LLMEngine]
) -> Iterator[tuple[AsyncEngine, AsyncEngine]]:
    """A prefill engine and a decode engine, synchronous or with overlapped scheduling (its default on CUDA, forced
    here: the port's contract must not depend on it), and with MTP speculative decoding in launched steps (the blob
    carries the MTP's state and draft, which the decode engine verifies first)."""
    overlap, mtp = request.param
    a = AsyncEngine(make_engine(overlap_scheduling=overlap, speculative_mtp=mtp), kv_chunk_size=4096)
    b = AsyncEngine(make_engine(overlap_scheduling=overlap, speculative_mtp=mtp))
    yield a, b
    a.close()
    b.close()


def _reference(make_engine: Callable[..., LLMEngine], spec: SamplingSpec) -> list[int]:
    return make_engine().generate_ids([PROMPT], SamplingParams.from_spec(spec))[0].token_ids


async def _collect(engine: AsyncEngine, request_id: str) -> list[TokenOutput]:
    return [t async for t in engine.stream(request_id)]


@pytest.mark.parametrize("spec", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_prefill_in_one_engine_decode_in_another(
    spec: SamplingSpec, engines: tuple[AsyncEngine, AsyncEngine], make_engine: Callable[..., LLMEngine]
) -> None:
    a, b = engines
    assert isinstance(a, Engine)
    expected = _reference(make_engine, spec)
    out = await a.prefill("r1", PROMPT, spec)
    assert out.first_token == expected[0] and out.prompt_tokens == len(PROMPT)
    chunks = list(out.kv_chunks)
    assert len(chunks) > 1 and all(len(c) <= 4096 for c in chunks[1:])
    blob = b"".join(chunks)
    assert len(blob) == out.kv_meta.total_bytes and out.kv_meta.num_tokens == len(PROMPT)
    assert out.kv_meta.model_fingerprint == a.model_fingerprint == b.model_fingerprint
    assert out.kv_meta.format_version == b.kv_format_version
    assert a.stats().kv_cache_used_blocks == 0, "the prefill engine frees the state once exported"
    await b.submit_decode("r1", PROMPT, spec, kv_blob=blob, streamed_ids=[out.first_token])
    tokens = await _collect(b, "r1")
    assert [t.index for t in tokens] == list(range(1, 7))
    assert [out.first_token] + [t.token_id for t in tokens] == expected
    assert tokens[-1].finish_reason == "length" and all(t.finish_reason is None for t in tokens[:-1])
    if spec.logprobs is not None:
        logprobs = [out.first_token_logprobs, *(t.logprobs for t in tokens)]
        assert all(lp is not None and len(lp.top) == spec.logprobs and lp.logprob <= 0 for lp in logprobs)
    assert b.stats().running_requests == 0 and b.stats().kv_cache_used_blocks == 0


async def test_recompute_and_local_prefill(
    engines: tuple[AsyncEngine, AsyncEngine], make_engine: Callable[..., LLMEngine]
) -> None:
    _, b = engines
    expected = _reference(make_engine, SEEDED)
    await b.submit_decode("resume", PROMPT, SEEDED, kv_blob=None, streamed_ids=expected[:3])
    await b.submit_decode("local", PROMPT, SEEDED, kv_blob=None, streamed_ids=[])
    resumed, local = await asyncio.gather(_collect(b, "resume"), _collect(b, "local"))
    assert [t.index for t in resumed] == [3, 4, 5, 6] and [t.token_id for t in resumed] == expected[3:]
    assert [t.token_id for t in local] == expected and local[0].index == 0


async def test_unseeded_requests_are_deterministic_per_request_id(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    a, b = engines
    spec = SamplingSpec(max_tokens=5, temperature=1.0, ignore_eos=True)
    first = await a.prefill("same-id", PROMPT, spec)
    await b.submit_decode("same-id", PROMPT, spec, kv_blob=None, streamed_ids=[])
    tokens = await _collect(b, "same-id")
    assert tokens[0].token_id == first.first_token


async def test_bad_blobs_raise_kv_import_error(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    a, b = engines
    out = await a.prefill("r", PROMPT, GREEDY)
    blob = b"".join(out.kv_chunks)
    with pytest.raises(KVImportError, match="checksum"):
        await b.submit_decode("r", PROMPT, GREEDY, kv_blob=blob[:-9] + b"\x00" + blob[-8:], streamed_ids=[1])
    with pytest.raises(KVImportError, match="positions"):
        await b.submit_decode("r", PROMPT[:-1], GREEDY, kv_blob=blob, streamed_ids=[out.first_token])
    # The refused request is not live: the caller resubmits it with kv_blob=None.
    await b.submit_decode("r", PROMPT, GREEDY, kv_blob=None, streamed_ids=[out.first_token])
    assert len(await _collect(b, "r")) == 6
    with pytest.raises(ValueError, match="exceeds the model's 1048576 positions"):
        await b.submit_decode("huge", PROMPT, SamplingSpec(max_tokens=10**7), kv_blob=None, streamed_ids=[])


async def test_cancel_ends_the_stream_and_frees_the_state(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    _, b = engines
    await b.submit_decode(
        "long", PROMPT, SamplingSpec(max_tokens=500, temperature=0.0, ignore_eos=True), kv_blob=None, streamed_ids=[]
    )
    seen: list[TokenOutput] = []
    async for t in b.stream("long"):
        seen.append(t)
        if len(seen) == 3:
            await b.cancel("long")
    assert seen[-1].finish_reason == "cancelled" and len(seen) < 500
    assert [t.index for t in seen] == list(range(len(seen)))
    await b.cancel("long")  # idempotent
    assert b.stats().running_requests == 0 and b.stats().kv_cache_used_blocks == 0


async def test_event_loop_keeps_running_while_the_engine_steps(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    _, b = engines
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await b.submit_decode(
        "busy", PROMPT, SamplingSpec(max_tokens=12, temperature=0.0, ignore_eos=True), kv_blob=None, streamed_ids=[]
    )
    before = ticks
    tokens = await _collect(b, "busy")
    stop.set()
    await task
    assert len(tokens) == 12
    assert ticks - before >= 12, "the loop should tick at least once per generated token"


async def test_a_prefill_the_caller_abandons_is_stopped(make_engine: Callable[..., LLMEngine]) -> None:
    with AsyncEngine(make_engine(max_num_batched_tokens=4)) as engine:
        # 800 prompt tokens at 4 per step: hundreds of steps, far longer than the wait below.
        task = asyncio.create_task(engine.prefill("gone", list(range(3, 803)), GREEDY))
        while engine.stats().running_requests == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.stats().running_requests == 0 and engine.stats().kv_cache_used_blocks == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running_requests == 0 and engine.stats().kv_cache_used_blocks == 0
        assert engine.stats().waiting_requests == 0


def test_a_caller_loop_that_closed_does_not_stop_the_engine(make_engine: Callable[..., LLMEngine]) -> None:
    """Tokens for a loop that is gone are dropped; the engine keeps serving the other callers."""
    engine = AsyncEngine(make_engine())
    try:

        async def abandon() -> None:
            long = SamplingSpec(max_tokens=40, temperature=0.0, ignore_eos=True)
            await engine.submit_decode("gone", PROMPT, long, kv_blob=None, streamed_ids=[])

        asyncio.run(abandon())  # this loop closes while its request still generates

        async def serve() -> list[TokenOutput]:
            await engine.submit_decode("next", PROMPT, GREEDY, kv_blob=None, streamed_ids=[])
            return await _collect(engine, "next")

        assert [t.index for t in asyncio.run(asyncio.wait_for(serve(), timeout=60))] == list(range(7))
    finally:
        engine.close()
