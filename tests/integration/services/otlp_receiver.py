"""A tiny real OTLP/HTTP trace receiver: decodes ExportTraceServiceRequest protobufs into flat span records."""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from dsv4.services.local_redis import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]


class OtlpReceiver:
    """Listens on a free loopback port; `endpoint` is the OTEL_EXPORTER_OTLP_TRACES_ENDPOINT to give exporters."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver._add(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def _add(self, req: ExportTraceServiceRequest) -> None:
        with self._lock:
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs: dict[str, object] = {}
                        for a in s.attributes:
                            v = a.value
                            attrs[a.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                        self.spans.append(
                            ReceivedSpan(
                                service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), attrs
                            )
                        )

    def wait_for(self, *names: str, trace_id: str | None = None, timeout: float = 15) -> dict[str, ReceivedSpan]:
        """The first received span of each name (in `trace_id`, when given), waiting until all arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                mine = [s for s in self.spans if trace_id is None or s.trace_id == trace_id]
                found = {n: next((s for s in mine if s.name == n), None) for n in names}
            if all(found.values()):
                return {n: s for n, s in found.items() if s is not None}
            time.sleep(0.05)
        raise AssertionError(f"spans {names} not all received in {timeout}s; got {[s.name for s in self.spans]}")

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
