"""What prefill and decode workers share: the consumer loop, heartbeats, reclaim, graceful drain, the HTTP side.

A worker runs up to `inflight_limit()` jobs (its engine's batch) as asyncio tasks. Every `heartbeat_s` it touches
the jobs it holds, so no other worker reclaims them; every few heartbeats it takes over jobs nobody touched for
`reclaim_idle_ms` (their worker died). On SIGTERM it stops reading, finishes what it holds (up to
`drain_timeout_s`), leaves the consumer group and exits; jobs it could not finish stay pending and are reclaimed by
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry.util.types import AttributeValue

from dsv4.model_runtime.engine.port import Engine
from dsv4.protocol import contract
from dsv4.protocol.connection import RedisUnavailable, connect
from dsv4.services import metrics, telemetry
from dsv4.services.health import health_routes
from dsv4.services.kv_direct import DirectStore, direct_router
from dsv4.services.prefix_tier import PrefixTier
from dsv4.services.work_queue import Delivery, Job, WorkQueue
from dsv4.services.workers.prefix_sharing import PrefixSharing
from dsv4.services.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

Handler = Callable[[Delivery], Awaitable[None]]

RECLAIM_EVERY_HEARTBEATS = 3
REDIS_RETRY_S = 1.0
_ENGINE_COUNTERS = {
    "prefill_tokens": metrics.PREFILL_TOKENS,
    "prefix_cache_queries": metrics.PREFIX_LOOKUPS,
    "prefix_cache_hits": metrics.PREFIX_HITS,
    "prefix_cache_query_tokens": metrics.PREFIX_LOOKUP_TOKENS,
    "prefix_cache_hit_tokens": metrics.PREFIX_HIT_TOKENS,
    "mtp_drafts_proposed": metrics.MTP_DRAFT_TOKENS,
    "mtp_drafts_accepted": metrics.MTP_ACCEPTED_TOKENS,
}


def start_job_trace(job: Job, queue_span: str) -> tuple[otel_context.Context, dict[str, AttributeValue]]:
    """The job's trace context and common span attributes; records the time it waited in the queue as `queue_span`.

    The worker's own spans of the job start in the returned context with these attributes."""
    ctx = telemetry.extract(job.trace_context)
    attrs: dict[str, AttributeValue] = {
        telemetry.ATTR_REQUEST_ID: job.request_id,
        telemetry.ATTR_PROMPT_TOKENS: len(job.prompt_ids),
    }
    telemetry.tracer().start_span(
        queue_span, context=ctx, start_time=job.enqueued_at_ms * 1_000_000, attributes=attrs
    ).end()
    return ctx, attrs


class WorkerRuntime:
    """The consumer side of one work stream, running `handle` for each job; `run()` until drained."""

    def __init__(self, role: contract.Role, settings: WorkerSettings, engine: Engine, stream: str) -> None:
        self.role = role
        self.settings = settings
        self.engine = engine
        password = settings.redis_password_value()
        self.client: aioredis.Redis = connect(settings.redis_url, password)
        self.queue = WorkQueue(self.client, settings.deployment, stream, consumer=settings.pod_name)
        self.direct_store = DirectStore()
        self.inflight: dict[tuple[str, str], tuple[Delivery, asyncio.Task[None]]] = {}
        self.draining = asyncio.Event()
        self.started = False
        self._handle: Handler | None = None
        self._counted: dict[str, float] = {}
        self.sharing = self._prefix_sharing(stream) if settings.prefix_cache.enabled else None
        self._tier_client: aioredis.Redis | None = None

    def _prefix_sharing(self, stream: str) -> PrefixSharing | None:
        """KV events for every worker whose engine caches prefixes; the shared tier for prefill workers."""
        if self.engine.prefix_block_size is None:
            return None
        s, tier = self.settings, None
        tier_cfg = s.prefix_cache.tier
        if self.role is contract.Role.PREFILL and tier_cfg.budget_bytes > 0:
            client = self.client
            if tier_cfg.redis_url:
                password = s.prefix_tier_redis_password
                client = self._tier_client = connect(
                    tier_cfg.redis_url, password.get_secret_value() if password else None
                )
            tier = PrefixTier(client, s.deployment, tier_cfg.budget_bytes, tier_cfg.ttl_seconds)
        return PrefixSharing(self.client, s.deployment, stream, s.pod_name, self.engine, tier)

    async def run(self, handle: Handler) -> None:
        """Consume jobs until `drain()` was called, then wait for in-flight jobs and leave the group."""
        self._handle = handle
        await self._until_redis(self.queue.ensure_group)
        await self._until_redis(self._heartbeat)
        self.started = True
        self._export_engine_stats()  # the pool's size is known from the start
        beat = asyncio.create_task(self._heartbeats())
        stop_sharing = asyncio.Event()
        sharing = asyncio.create_task(self.sharing.run(stop_sharing)) if self.sharing is not None else None
        try:
            while not self.draining.is_set():
                free = self.settings.inflight_limit() - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(self._tasks(), return_when=asyncio.FIRST_COMPLETED, timeout=1)
                    continue
                try:
                    deliveries = await self.queue.read(count=free)
                except RedisUnavailable as e:
                    log.warning("%s; retrying in %.0f s", e, REDIS_RETRY_S)
                    await asyncio.sleep(REDIS_RETRY_S)
                    continue
                for d in deliveries:
                    self._start(d, handle)
            stop_sharing.set()  # first: the gateways stop pushing work here while the jobs in flight finish
            await self._drain()
        finally:
            stop_sharing.set()
            if sharing is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sharing
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    def drain(self) -> None:
        """Stop taking work (SIGTERM)."""
        if not self.draining.is_set():
            log.info("draining: %d jobs in flight", len(self.inflight))
        self.draining.set()

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [task for _, task in self.inflight.values()]

    def _start(self, d: Delivery, handle: Handler) -> None:
        where = (d.stream_key, d.entry_id)
        if where in self.inflight:
            return
        task = asyncio.create_task(self._run_one(d, handle), name=f"job-{d.job.request_id}")
        self.inflight[where] = (d, task)
        task.add_done_callback(lambda _: self.inflight.pop(where, None))

    async def _run_one(self, d: Delivery, handle: Handler) -> None:
        try:
            await handle(d)
        except RedisUnavailable as e:
            # Nothing was acknowledged: the job stays pending and is reclaimed (here or elsewhere) once Redis is back.
            log.warning("job %s of request %s interrupted: %s", d.entry_id, d.job.request_id, e)
        except Exception:
            log.exception("job %s of request %s failed", d.entry_id, d.job.request_id)

    async def _heartbeats(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            n += 1
            try:
                await self._heartbeat()
                await self.queue.touch([d for d, _ in self.inflight.values()])
                if n % RECLAIM_EVERY_HEARTBEATS == 0 and not self.draining.is_set():
                    free = self.settings.inflight_limit() - len(self.inflight)
                    if free > 0 and self._handle is not None:
                        for d in await self.queue.reclaim(self.settings.reclaim_idle_ms, count=free):
                            log.info("took over job %s of request %s", d.entry_id, d.job.request_id)
                            self._start(d, self._handle)
            except RedisUnavailable as e:
                log.warning("heartbeat skipped: %s", e)
            self._export_engine_stats()

    async def _heartbeat(self) -> None:
        if not self.draining.is_set():  # a draining worker lets its heartbeat lapse: its own stream goes to others
            await self.queue.heartbeat(self.settings.reclaim_idle_ms)

    def _export_engine_stats(self) -> None:
        stats = self.engine.stats()
        role = self.role.value
        metrics.BATCH_SIZE.labels(role=role).set(stats.running_requests)
        if stats.kv_cache_total_blocks:
            usage = stats.kv_cache_used_blocks / stats.kv_cache_total_blocks
            metrics.KV_CACHE_USAGE.labels(role=role).set(usage)
        metrics.KV_POOL_BLOCKS.labels(role=role).set(stats.kv_cache_total_blocks)
        extra = stats.extra
        if "kv_pool_max_tokens" in extra:
            metrics.KV_POOL_MAX_TOKENS.labels(role=role).set(extra["kv_pool_max_tokens"])
        for name, counter in _ENGINE_COUNTERS.items():  # the engine's totals since start, as counter increments
            if name in extra:
                counter.labels(role=role).inc(max(0.0, extra[name] - self._counted.get(name, 0.0)))
                self._counted[name] = extra[name]
        if "prefix_cache_bytes" in extra:
            metrics.PREFIX_BYTES.labels(role=role, tier="local").set(extra["prefix_cache_bytes"])
            for unit, hit, total in (
                ("tokens", "prefix_cache_hit_tokens", "prefix_cache_query_tokens"),
                ("requests", "prefix_cache_hits", "prefix_cache_queries"),
            ):
                if extra[total]:
                    metrics.PREFIX_HIT_RATIO.labels(role=role, unit=unit).set(extra[hit] / extra[total])

    async def _drain(self) -> None:
        if self.inflight:
            _, pending = await asyncio.wait(self._tasks(), timeout=self.settings.drain_timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("drain timeout: %d jobs left pending for other workers to reclaim", len(pending))
                await asyncio.wait(pending, timeout=5)
        try:
            left = await self.queue.leave()
            log.info("drained; %s the consumer group", "left" if left else "could not leave (jobs pending)")
        except RedisUnavailable as e:
            log.warning("drained, but could not leave the consumer group: %s", e)

    async def _until_redis(self, op: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await op()
                return
            except RedisUnavailable as e:
                if self.draining.is_set():
                    raise
                log.warning("%s; retrying in %.0f s", e, REDIS_RETRY_S)
                await asyncio.sleep(REDIS_RETRY_S)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._tier_client is not None:
            await self._tier_client.aclose()


def create_worker_app(runtime: WorkerRuntime) -> FastAPI:
    """The worker's HTTP side on WORKER_PORT: health, readiness, metrics and the `direct` KV data plane."""
    app = FastAPI(title=f"dsv4 {runtime.role.value} worker", docs_url=None, redoc_url=None, openapi_url=None)

    async def readiness() -> tuple[bool, dict[str, Any]]:
        if runtime.draining.is_set():
            return False, {"status": "draining"}
        if not runtime.started:
            return False, {"status": "starting"}
        return True, {"status": "ready", "inflight": len(runtime.inflight)}

    app.include_router(health_routes(readiness))
    app.include_router(direct_router(runtime.direct_store))
    return app


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM means "drain" for the runtime, not "exit now"."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_worker(runtime: WorkerRuntime, handle: Handler) -> None:
    """Run the consumer loop and the HTTP side until SIGTERM/SIGINT, then drain and stop both."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.drain)
    config = uvicorn.Config(
        create_worker_app(runtime), host=runtime.settings.host, port=runtime.settings.port, log_level="warning"
    )
    server = QuietServer(config)
    http = asyncio.create_task(server.serve())
    try:
        await runtime.run(handle)
    finally:
        server.should_exit = True
        await http
        await runtime.aclose()
