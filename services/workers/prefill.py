"""The prefill worker: prompt → first token (streamed at once) → KV handoff → decode job (docs/serving.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from dsv4.protocol import contract, keys
from dsv4.protocol.connection import unavailable_as_typed
from dsv4.protocol.keys import descriptor_key, handed_over_key
from dsv4.services import metrics, telemetry
from dsv4.services.handoff import HandoffWriter
from dsv4.services.token_stream import TOKEN_STREAM_TTL_S, TokenWriter, Usage, is_cancelled
from dsv4.services.work_queue import Delivery, Job, WorkQueue
from dsv4.services.workers.runtime import WorkerRuntime, start_job_trace

log = logging.getLogger(__name__)


class PrefillWorker:
    """Handles jobs of the `prefill` stream with the runtime's engine."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        s = runtime.settings
        self.decode_queue = WorkQueue(runtime.client, s.deployment, keys.DECODE_STREAM)
        self.writer = HandoffWriter(
            runtime.client,
            s.deployment,
            transport=s.kv_handoff.transport,
            ttl_s=s.kv_handoff.ttl_seconds,
            direct_store=runtime.direct_store,
            direct_url=f"http://{s.pod_ip}:{s.port}",
        )

    async def handle(self, d: Delivery) -> None:
        job, rt, dep = d.job, self.rt, self.rt.settings.deployment
        ctx, attrs = start_job_trace(job, telemetry.SPAN_PREFILL_QUEUE)
        tracer = telemetry.tracer()
        if await is_cancelled(rt.client, dep, job.request_id) or (
            d.reclaimed and await rt.client.exists(handed_over_key(dep, job.request_id))
        ):
            await rt.queue.ack(d)
            return
        tokens = TokenWriter(rt.client, dep, job.request_id)
        with tracer.start_as_current_span(telemetry.SPAN_PREFILL_COMPUTE, context=ctx, attributes=attrs) as span:
            if rt.sharing is not None:
                imported = await rt.sharing.before_prefill(job.prompt_ids)
                span.set_attribute(telemetry.ATTR_PREFIX_IMPORTED_TOKENS, imported)
            try:
                out = await rt.engine.prefill(job.request_id, job.prompt_ids, job.sampling)
            except ValueError as e:  # the engine refuses the request itself (too long, bad ids): not retryable
                await tokens.fail(str(e), "invalid_request")
                await rt.queue.ack(d)
                return
            # Token 0 goes to the client now: time to first token does not include the handoff.
            await tokens.write(0, [out.first_token], [out.first_token_logprobs])
            metrics.GENERATED_TOKENS.labels(role=contract.Role.PREFILL.value).inc()
            if out.finish_reason is not None or job.sampling.max_tokens <= 1:
                await tokens.finish(out.finish_reason or "length", Usage(len(job.prompt_ids), 1))
                await rt.queue.ack(d)
                return
            with tracer.start_as_current_span(telemetry.SPAN_KV_EXPORT, attributes=attrs):
                chunks = await asyncio.to_thread(list, out.kv_chunks)  # serialization must not block the loop
            with tracer.start_as_current_span(telemetry.SPAN_KV_WRITE, attributes=attrs) as span:
                t0 = time.monotonic()
                desc = await self.writer.write(
                    job.request_id, out.kv_meta, chunks, out.first_token, trace_context=telemetry.inject()
                )
                seconds = time.monotonic() - t0
                span.set_attribute(telemetry.ATTR_KV_BYTES, desc.total_bytes)
                span.set_attribute(telemetry.ATTR_KV_CHUNKS, len(desc.chunk_sizes))
                span.set_attribute(telemetry.ATTR_KV_TRANSPORT, desc.transport)
                span.set_attribute(telemetry.ATTR_TRANSFER_MS, seconds * 1000)
            metrics.HANDOFF_BYTES.labels(transport=desc.transport, direction="write").inc(desc.total_bytes)
            metrics.HANDOFF_SECONDS.labels(transport=desc.transport, direction="write").observe(seconds)
            decode_job = Job(
                job.request_id,
                job.prompt_ids,
                job.sampling,
                handoff_key=descriptor_key(dep, desc.handoff_id),
                trace_context=telemetry.inject(),
                enqueued_at_ms=int(time.time() * 1000),
            )
        # Enqueue first, then mark: a crash in between duplicates the decode (its tokens are dropped by index),
        # never loses the request.
        await self.decode_queue.enqueue(decode_job)
        with unavailable_as_typed("marking a handover"):
            await rt.client.set(handed_over_key(dep, job.request_id), b"1", ex=TOKEN_STREAM_TTL_S)
        await rt.queue.ack(d)
