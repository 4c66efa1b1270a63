"""OpenTelemetry tracing for every role, configured by the standard `OTEL_*` variables, and W3C propagation.

`setup_tracing` installs an SDK tracer provider whose resource, sampler and batch processor read `OTEL_*` as the
SDK defines them; an OTLP/HTTP exporter is attached when `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_TRACES_EXPORTER` is not `none`), so a pod without a
collector creates spans for propagation and exports nothing. The trace context crosses Redis as the W3C
`traceparent`/`tracestate` strings in queue entries and handoff descriptors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "dsv4.services"

# Span names (docs/serving.md, Telemetry).
SPAN_GATEWAY = "gateway.request"
SPAN_PREFILL_QUEUE = "prefill.queue"
SPAN_PREFILL_COMPUTE = "prefill.compute"
SPAN_KV_EXPORT = "kv.export"
SPAN_KV_WRITE = "kv.write"
SPAN_DECODE_QUEUE = "decode.queue"
SPAN_KV_READ = "kv.read"
SPAN_KV_IMPORT = "kv.import"
SPAN_DECODE_GENERATE = "decode.generate"

# Attribute names.
ATTR_REQUEST_ID = "dsv4.request_id"
ATTR_PROMPT_TOKENS = "dsv4.prompt_tokens"
ATTR_COMPLETION_TOKENS = "dsv4.completion_tokens"
ATTR_DISAGGREGATED = "dsv4.disaggregated"
ATTR_DECISION_REASON = "dsv4.prefill_decision_reason"
ATTR_KV_BYTES = "dsv4.kv.bytes"
ATTR_KV_CHUNKS = "dsv4.kv.chunks"
ATTR_KV_TRANSPORT = "dsv4.kv.transport"
ATTR_TRANSFER_MS = "dsv4.kv.transfer_ms"
ATTR_FINISH_REASON = "dsv4.finish_reason"
ATTR_ROUTE_WORKER = "dsv4.route.worker"  # the worker whose own stream got the job ("" = the shared stream)
ATTR_ROUTE_REASON = "dsv4.route.reason"  # prefix | load | shared
ATTR_ROUTE_MATCHED_TOKENS = "dsv4.route.matched_tokens"  # prompt tokens the chosen worker holds (as far as known)
ATTR_PREFIX_IMPORTED_TOKENS = "dsv4.prefix.imported_tokens"  # prompt tokens imported from the Redis tier

_PROPAGATOR = TraceContextTextMapPropagator()
_installed: TracerProvider | None = None


def setup_tracing(service_name: str) -> TracerProvider:
    """Install (once per process) the tracer provider of a role; `OTEL_SERVICE_NAME` overrides `service_name`."""
    global _installed
    if _installed is not None:
        return _installed
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    if _exporter_configured():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _installed = provider
    return provider


def _exporter_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def shutdown_tracing() -> None:
    """Flush and stop the exporter (at process exit, so the last spans are not lost)."""
    if _installed is not None:
        _installed.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C `traceparent` (and `tracestate`) of the current span, for a queue entry or descriptor."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context a queue entry or descriptor carries; start the worker's spans in it."""
    return _PROPAGATOR.extract(dict(carrier))
