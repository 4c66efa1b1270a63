"""Gateway + 1 prefill + 2 decode workers as real processes on a real redis-server and the tiny checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from dsv4.model_runtime.engine.llm import LLM
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services import telemetry
from dsv4.services.local_redis import LocalRedis

from ..integration.services.otlp_receiver import OtlpReceiver
from .processes import RoleGroup, RoleProcess
from .streams import completions_killed_midway

pytestmark = pytest.mark.e2e

KEY = "sk-e2e"
MODEL = "deepseek-v4-flash"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("e2e") / "tiny-flash", "tiny-flash", quantized=True, seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint))


class Cluster(RoleGroup):
    def __init__(self, checkpoint: Path, redis: LocalRedis, otlp_endpoint: str) -> None:
        self.redis = redis
        redis_url = redis.url
        env = {
            "DSV4_DEPLOYMENT": "e2e",
            "DSV4_MODEL": str(checkpoint),
            "DSV4_REDIS_URL": redis_url,
            "DSV4_API_KEYS": KEY,
            "DSV4_DISAGGREGATION__MODE": "always",
            "DSV4_RECLAIM_IDLE_MS": "1500",
            "DSV4_HEARTBEAT_S": "0.3",
            "DSV4_TOKEN_TIMEOUT_S": "60",
            "OMP_NUM_THREADS": "1",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        self.gateway = RoleProcess("gateway", [], env)
        self.prefill = RoleProcess("prefill", [], env)
        self.decode = [RoleProcess("decode", [], env) for _ in range(2)]

    def all(self) -> list[RoleProcess]:
        return [self.gateway, self.prefill, *self.decode]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def cluster(checkpoint: Path, receiver: OtlpReceiver) -> Iterator[Cluster]:
    with LocalRedis() as redis_server:
        c = Cluster(checkpoint, redis_server, receiver.endpoint)
        c.start()
        try:
            yield c
        finally:
            c.stop()


def client(c: Cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=c.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


async def test_streamed_chat_equals_llm_generate(cluster: Cluster, reference: LLM, checkpoint: Path) -> None:
    tok = Tokenizer.from_pretrained(checkpoint)
    prompt_ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>Tell me about Redis.<｜Assistant｜></think>")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    [expected] = reference.generate([prompt_ids], params)
    async with client(cluster) as c:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about Redis."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            top_logprobs=2,
            extra_body={"ignore_eos": True},
        )
        chunks = [ch async for ch in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == tok.decode(expected.token_ids)
    # Logprobs from the prefill worker (token 0) and the decode worker (the rest) match the in-process engine's.
    got = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert [bytes(e.bytes or []) for e in got] == [tok.token_bytes(t) for t in expected.token_ids]
    for e, want in zip(got, expected.logprobs, strict=True):
        assert e.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [bytes(x.bytes or []) for x in e.top_logprobs] == [tok.token_bytes(i) for i, _ in want.top]
        assert [x.logprob for x in e.top_logprobs] == pytest.approx([v for _, v in want.top], abs=1e-4)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    async with httpx.AsyncClient() as h:
        prefill_metrics = (await h.get(cluster.prefill.url + "/metrics")).text
    assert 'dsv4_handoff_bytes_total{direction="write",transport="redis"}' in prefill_metrics
    # The KV pool's size (a CPU worker's "auto" pool: 4096 blocks of 256 positions).
    assert 'dsv4_kv_pool_blocks{role="prefill"} 4096.0' in prefill_metrics
    assert 'dsv4_kv_pool_max_tokens{role="prefill"} 1.048576e+06' in prefill_metrics


async def test_sigkill_of_a_decode_worker_mid_stream_loses_and_duplicates_nothing(
    cluster: Cluster, reference: LLM
) -> None:
    prompts = [[(31 * k + 7 * i) % 120000 + 100 for k in range(12 + i)] for i in range(10)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    tok = Tokenizer.from_pretrained()
    victim = cluster.decode[0]

    async def kill() -> None:
        await asyncio.to_thread(victim.kill)

    async with client(cluster) as c:
        texts = await completions_killed_midway(c, MODEL, prompts, 48, kill, started_timeout=120, done_timeout=180)
    for i, text in enumerate(texts):
        assert text == tok.decode(expected[i], skip_special_tokens=True), f"request {i}"
    # Bring the pool back for any later test.
    cluster.decode[0] = RoleProcess("decode", [], victim.env).start().wait_ready()


async def test_one_trace_spans_gateway_prefill_and_decode(cluster: Cluster, receiver: OtlpReceiver) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(
            cluster.gateway.url + "/v1/completions",
            json={"model": MODEL, "prompt": [11, 12, 13, 14], "max_tokens": 4, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        )
    assert r.status_code == 200, r.text
    names = (
        telemetry.SPAN_GATEWAY,
        telemetry.SPAN_PREFILL_QUEUE,
        telemetry.SPAN_PREFILL_COMPUTE,
        telemetry.SPAN_KV_EXPORT,
        telemetry.SPAN_KV_WRITE,
        telemetry.SPAN_DECODE_QUEUE,
        telemetry.SPAN_DECODE_GENERATE,
        telemetry.SPAN_KV_READ,
        telemetry.SPAN_KV_IMPORT,
    )
    spans = receiver.wait_for(*names, trace_id=trace_id, timeout=30)
    assert {s.service for s in spans.values()} == {"gateway", "prefill", "decode"}
    assert (
        spans[telemetry.SPAN_KV_WRITE].attributes[telemetry.ATTR_KV_BYTES]
        == (spans[telemetry.SPAN_KV_READ].attributes[telemetry.ATTR_KV_BYTES])
    )
    by_id = {s.span_id: s for s in receiver.spans if s.trace_id == trace_id}
    assert by_id[spans[telemetry.SPAN_DECODE_GENERATE].parent_span_id].name == telemetry.SPAN_PREFILL_COMPUTE
    assert by_id[spans[telemetry.SPAN_PREFILL_COMPUTE].parent_span_id].name == telemetry.SPAN_GATEWAY


async def test_redis_restart_under_load_ends_in_answers_or_clean_errors(cluster: Cluster) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        try:
            stream = await c.completions.create(
                model=MODEL, prompt=[100 + i, 200, 300], max_tokens=40, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            n = 0
            async for _ in stream:
                n += 1
            return "completed" if n else "empty"
        except openai.APIStatusError as e:
            return f"http {e.status_code}"
        except openai.APIError as e:  # an error event inside an open stream
            return f"stream error: {e.message[:40]}"

    async with client(cluster) as c:
        tasks = [asyncio.create_task(one(c, i)) for i in range(10)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.redis.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.redis.start)
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)  # no hang
        # No 504: a request the restarted (empty) Redis lost is told so through its lease, not by the token timeout.
        assert all(o == "completed" or o.startswith(("http 503", "stream error")) for o in outcomes), outcomes
        for p in [cluster.prefill, *cluster.decode]:  # the workers recreate their groups and are ready again
            await asyncio.to_thread(p.wait_ready, 30)
        resp = await c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert resp.usage is not None and resp.usage.completion_tokens == 3
