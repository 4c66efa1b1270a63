"""Prefix-aware routing with real processes: gateway, two prefill workers and a decode worker on a real redis-server.

Each prefill worker is warmed on its own system prompt (the router sends a new prefix to the worker holding fewer);
then requests land on the worker holding their prefix, and give the tokens of an engine without a cache. When a
worker is killed, its requests (those in flight and those the gateway still pushes to it) complete on the other.
Which worker computed a request is read from its `prefill.compute` span (each worker has its own service name).
Workers run float64: their chunks differ from the reference engine's (exactness must not hang on fp32 rounding).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.services import telemetry
from dsv4.services.local_redis import LocalRedis

from ..integration.services.otlp_receiver import OtlpReceiver
from .processes import RoleGroup, RoleProcess

pytestmark = pytest.mark.e2e

KEY = "sk-e2e"
MODEL = "deepseek-v4-flash"
MAX_TOKENS = 4
# Longer than one 256-token block (the workers' default block size), so a system prompt has an aligned entry.
SYSTEMS = {
    name: torch.randint(3, 120000, (300,), generator=torch.Generator().manual_seed(seed)).tolist()
    for name, seed in (("a", 1), ("b", 2))
}


def _prompt(system: str, k: int) -> list[int]:
    return [*SYSTEMS[system], 7 + k, 11 + 2 * k, 13]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("route") / "tiny-flash", "tiny-flash", quantized=True, seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LLMEngine:
    torch.set_num_threads(1)
    return LLMEngine.from_path(checkpoint, dtype=torch.float64, config=EngineConfig(prefix_cache=False))


class Cluster(RoleGroup):
    def __init__(self, checkpoint: Path, redis: LocalRedis, otlp_endpoint: str) -> None:
        env = {
            "DSV4_DEPLOYMENT": "route",
            "DSV4_MODEL": str(checkpoint),
            "DSV4_REDIS_URL": redis.url,
            "DSV4_API_KEYS": KEY,
            "DSV4_DISAGGREGATION__MODE": "always",
            "DSV4_DTYPE": "float64",
            "DSV4_RECLAIM_IDLE_MS": "1500",
            "DSV4_HEARTBEAT_S": "0.3",
            "DSV4_TOKEN_TIMEOUT_S": "90",
            "DSV4_QUEUE_STATS_TTL_S": "0",
            "OMP_NUM_THREADS": "1",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        self.gateway = RoleProcess("gateway", [], env)
        self.prefill = {}
        for name in ("p1", "p2"):
            p = RoleProcess("prefill", [], env)
            p.env["DSV4_POD_NAME"] = p.env["OTEL_SERVICE_NAME"] = name
            self.prefill[name] = p
        self.decode = RoleProcess("decode", [], env)

    def all(self) -> list[RoleProcess]:
        return [self.gateway, *self.prefill.values(), self.decode]


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


async def _complete(h: httpx.AsyncClient, c: Cluster, prompt: list[int]) -> tuple[str, str]:
    """Send one completion with a known trace id; returns (trace id, its text)."""
    trace_id = uuid.uuid4().hex
    r = await h.post(
        c.gateway.url + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        },
        headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    assert r.status_code == 200, r.text
    return trace_id, r.json()["choices"][0]["text"]


def _worker_of(receiver: OtlpReceiver, trace_id: str) -> str:
    spans = receiver.wait_for(telemetry.SPAN_PREFILL_COMPUTE, trace_id=trace_id, timeout=30)
    return spans[telemetry.SPAN_PREFILL_COMPUTE].service


def _text(reference: LLMEngine, prompt: list[int]) -> str:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out = reference.generate_ids([prompt], params)[0].token_ids
    assert reference.tokenizer is not None
    return reference.tokenizer.decode(out, skip_special_tokens=True)


async def test_requests_land_on_the_worker_warm_on_their_system_prompt(
    cluster: Cluster, receiver: OtlpReceiver, reference: LLMEngine
) -> None:
    async with httpx.AsyncClient(timeout=120) as h:
        warm = {}
        for system in ("a", "b"):  # one after the other: the second prefix goes to the worker holding none
            trace_id, _ = await _complete(h, cluster, _prompt(system, 100))
            warm[system] = _worker_of(receiver, trace_id)
            await asyncio.sleep(1.0)  # its stored events reach the gateway
        assert warm["a"] != warm["b"], f"both prefixes warmed on {warm['a']}"
        prompts = [(system, _prompt(system, k)) for k in range(10) for system in ("a", "b")]
        results = await asyncio.gather(*(_complete(h, cluster, p) for _, p in prompts))
    served = [_worker_of(receiver, trace_id) for trace_id, _ in results]
    landed = [worker == warm[system] for (system, _), worker in zip(prompts, served, strict=True)]
    assert sum(landed) >= 0.9 * len(prompts), f"{sum(landed)} of {len(prompts)} on the warm worker"
    for (_, prompt), (_, text) in zip(prompts, results, strict=True):
        assert text == _text(reference, prompt)
    spans = [s for s in receiver.spans if s.name == telemetry.SPAN_GATEWAY]
    reasons = {s.attributes.get(telemetry.ATTR_ROUTE_REASON) for s in spans}
    assert "prefix" in reasons
    async with httpx.AsyncClient() as h:
        metrics = (await h.get(cluster.prefill[warm["a"]].url + "/metrics")).text
    assert "dsv4_prefix_cache_hit_tokens_total" in metrics


async def test_a_killed_workers_requests_complete_elsewhere(
    cluster: Cluster, receiver: OtlpReceiver, reference: LLMEngine
) -> None:
    async with httpx.AsyncClient(timeout=120) as h:
        trace_id, _ = await _complete(h, cluster, _prompt("a", 200))
        victim = _worker_of(receiver, trace_id)
        survivor = next(n for n in cluster.prefill if n != victim)
        prompts = [_prompt("a", 300 + k) for k in range(6)]
        tasks = [asyncio.create_task(_complete(h, cluster, p)) for p in prompts]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.prefill[victim].kill)
        later = [_prompt("a", 400 + k) for k in range(3)]  # the gateway may still push these to the dead worker
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, *(_complete(h, cluster, p) for p in later)), timeout=180
        )
    for prompt, (_, text) in zip(prompts + later, results, strict=True):
        assert text == _text(reference, prompt)
    # A request the victim prefilled just before it died may have lost its spans with it; those sent after the
    # kill were prefilled by the survivor (read from the shared stream, or taken over from the victim's own).
    assert {_worker_of(receiver, t) for t, _ in results[len(prompts) :]} == {survivor}
