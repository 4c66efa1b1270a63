"""One trace id from the client's traceparent through the gateway span to a worker-side span, via a real OTLP
receiver; the worker side is the test, continuing the context the queue entry carries."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from dsv4.model_runtime.chat_tokens import EOS
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services import telemetry
from dsv4.services.local_redis import LocalRedis
from dsv4.services.token_stream import TokenWriter
from dsv4.services.work_queue import Job

from .conftest import API_KEY, MODEL, GatewayProcess, write_tokens
from .otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


async def test_trace_spans_client_gateway_and_worker(module_redis: LocalRedis, worker_side) -> None:  # type: ignore[no-untyped-def]
    ids = Tokenizer.from_pretrained().encode("traced" + EOS)
    with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "test-decode"}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint), schedule_delay_millis=50)
        )
        worker_tracer = provider.get_tracer("test")

        async def respond(job: Job, writer: TokenWriter) -> None:
            ctx = telemetry.extract(job.trace_context)
            with worker_tracer.start_as_current_span(telemetry.SPAN_DECODE_GENERATE, context=ctx):
                await write_tokens(job, writer, ids)

        worker_side(respond)
        gw = GatewayProcess(
            module_redis.url,
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_SERVICE_NAME": "test-gateway",
            },
        )
        await asyncio.to_thread(gw.start)  # never block the loop the worker side runs on
        try:
            async with httpx.AsyncClient(timeout=20) as h:
                r = await h.post(
                    gw.url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                    headers={
                        "Authorization": f"Bearer {API_KEY}",
                        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01",
                    },
                )
            assert r.status_code == 200, r.text
            provider.force_flush()
            spans = receiver.wait_for(telemetry.SPAN_GATEWAY, telemetry.SPAN_DECODE_GENERATE)
        finally:
            await asyncio.to_thread(gw.stop)
            provider.shutdown()
    gateway_span, worker_span = spans[telemetry.SPAN_GATEWAY], spans[telemetry.SPAN_DECODE_GENERATE]
    assert (gateway_span.service, worker_span.service) == ("test-gateway", "test-decode")
    assert gateway_span.trace_id == worker_span.trace_id == CLIENT_TRACE
    assert gateway_span.parent_span_id == CLIENT_PARENT
    assert worker_span.parent_span_id == gateway_span.span_id
    assert gateway_span.attributes[telemetry.ATTR_REQUEST_ID] == r.json()["id"]
    assert gateway_span.attributes[telemetry.ATTR_DISAGGREGATED] is False
    assert gateway_span.attributes[telemetry.ATTR_COMPLETION_TOKENS] == len(ids)
