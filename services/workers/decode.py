"""The decode worker: import the handoff (or prefill locally / recompute), stream tokens, end the request.

Takeover: a reclaimed job resumes after the tokens already in the request's token stream, from the handoff blob
when it is still there and valid, else by recomputing prompt + streamed tokens; the client's reader drops any
token written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dsv4.model_runtime.engine.port import KVImportError
from dsv4.protocol import contract
from dsv4.services import metrics, telemetry
from dsv4.services.handoff import Handoff, HandoffError, HandoffReader
from dsv4.services.token_stream import TokenWriter, Usage, is_cancelled
from dsv4.services.work_queue import Delivery, Job
from dsv4.services.workers.runtime import WorkerRuntime, start_job_trace

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5


class DecodeWorker:
    """Handles jobs of the `decode` stream with the runtime's engine."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        self.reader = HandoffReader(runtime.client, runtime.settings.deployment)

    async def handle(self, d: Delivery) -> None:
        job, rt, dep = d.job, self.rt, self.rt.settings.deployment
        ctx, attrs = start_job_trace(job, telemetry.SPAN_DECODE_QUEUE)
        tracer = telemetry.tracer()
        tokens = TokenWriter(rt.client, dep, job.request_id)
        streamed, ended = await tokens.progress()
        if ended or await is_cancelled(rt.client, dep, job.request_id):
            await rt.queue.ack(d)
            return
        with tracer.start_as_current_span(telemetry.SPAN_DECODE_GENERATE, context=ctx, attributes=attrs) as span:
            handoff = await self._read_handoff(job) if job.handoff_key else None
            if handoff is not None and not streamed:
                streamed = [handoff.descriptor.first_token]
                await tokens.write(0, streamed)
            span.set_attribute("dsv4.resumed_tokens", len(streamed))
            if len(streamed) >= job.sampling.max_tokens:
                await tokens.finish("length", Usage(len(job.prompt_ids), len(streamed)))
            elif await self._submit(job, handoff, streamed, tokens):
                await self._stream(job, tokens, span)
        await rt.queue.ack(d)

    async def _read_handoff(self, job: Job) -> Handoff | None:
        assert job.handoff_key is not None
        engine = self.rt.engine
        with telemetry.tracer().start_as_current_span(telemetry.SPAN_KV_READ) as span:
            t0 = time.monotonic()
            try:
                h = await self.reader.read(
                    job.handoff_key,
                    model_fingerprint=engine.model_fingerprint,
                    kv_format_version=engine.kv_format_version,
                )
            except HandoffError as e:
                metrics.HANDOFF_FAILURES.labels(reason=type(e).__name__).inc()
                span.record_exception(e)
                log.warning("request %s: handoff unusable (%s); recomputing the prefill", job.request_id, e)
                return None
            seconds = time.monotonic() - t0
            span.set_attribute(telemetry.ATTR_KV_BYTES, h.descriptor.total_bytes)
            span.set_attribute(telemetry.ATTR_KV_CHUNKS, len(h.descriptor.chunk_sizes))
            span.set_attribute(telemetry.ATTR_KV_TRANSPORT, h.descriptor.transport)
            span.set_attribute(telemetry.ATTR_TRANSFER_MS, seconds * 1000)
        metrics.HANDOFF_BYTES.labels(transport=h.descriptor.transport, direction="read").inc(h.descriptor.total_bytes)
        metrics.HANDOFF_SECONDS.labels(transport=h.descriptor.transport, direction="read").observe(seconds)
        return h

    async def _submit(self, job: Job, handoff: Handoff | None, streamed: list[int], tokens: TokenWriter) -> bool:
        """Admit the request into the engine; False when it was refused (the client got an error)."""
        engine = self.rt.engine
        try:
            if handoff is not None:
                try:
                    with telemetry.tracer().start_as_current_span(telemetry.SPAN_KV_IMPORT):
                        await engine.submit_decode(
                            job.request_id, job.prompt_ids, job.sampling, kv_blob=handoff.blob, streamed_ids=streamed
                        )
                    await self.reader.release(handoff.descriptor)  # the engine owns the state now
                    return True
                except KVImportError as e:
                    metrics.HANDOFF_FAILURES.labels(reason="KVImportError").inc()
                    log.warning("request %s: KV import refused (%s); recomputing the prefill", job.request_id, e)
            await engine.submit_decode(
                job.request_id, job.prompt_ids, job.sampling, kv_blob=None, streamed_ids=streamed
            )
            return True
        except ValueError as e:  # the engine refuses the request itself: not retryable
            await tokens.fail(str(e), "invalid_request")
            return False

    async def _stream(self, job: Job, tokens: TokenWriter, span: telemetry.trace.Span) -> None:
        engine, rid = self.rt.engine, job.request_id
        watcher = asyncio.create_task(self._watch_cancel(rid))
        finished = False
        try:
            async for t in engine.stream(rid):
                if t.finish_reason == "cancelled":
                    finished = True
                    return
                if t.finish_reason == "error":
                    finished = True
                    await tokens.fail("the engine failed while generating", "engine_error")
                    return
                await tokens.write(t.index, [t.token_id], [t.logprobs])
                metrics.GENERATED_TOKENS.labels(role=contract.Role.DECODE.value).inc()
                if t.finish_reason is not None:
                    finished = True
                    await tokens.finish(t.finish_reason, Usage(len(job.prompt_ids), t.index + 1))
                    span.set_attribute(telemetry.ATTR_COMPLETION_TOKENS, t.index + 1)
                    span.set_attribute(telemetry.ATTR_FINISH_REASON, t.finish_reason)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not finished:  # interrupted (Redis gone, drain timeout): free the engine; the job stays pending
                await engine.cancel(rid)

    async def _watch_cancel(self, request_id: str) -> None:
        dep = self.rt.settings.deployment
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            with contextlib.suppress(Exception):
                if await is_cancelled(self.rt.client, dep, request_id):
                    await self.rt.engine.cancel(request_id)
                    return
