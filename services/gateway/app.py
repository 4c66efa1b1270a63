"""The gateway's FastAPI app: OpenAI-compatible endpoints over the Redis queue protocol (docs/serving.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.model_runtime.chat_encoding import ChatEncoder
from dsv4.model_runtime.chat_parsing import CompletionStreamParser, DeltaEvent
from dsv4.model_runtime.dsml import forced_tool_call_prefix
from dsv4.model_runtime.engine.port import SamplingSpec, TokenLogprobs
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.protocol import contract, keys
from dsv4.protocol.connection import RedisUnavailable, connect
from dsv4.protocol.stats import QueueStats, queue_stats
from dsv4.services import metrics, telemetry
from dsv4.services.gateway.decision import PrefillDecision, decide_prefill
from dsv4.services.gateway.errors import APIError, install_error_handlers, invalid, unavailable
from dsv4.services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.gateway.streaming import Done, TextDelta, text_stream
from dsv4.services.queues import Job, TokenStreamFailed, TokenStreamGap, TokenStreamTimeout, WorkQueue

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


class _RequestIdMiddleware:
    """Echo the caller's X-Request-Id (a fresh one when absent or unusable) on every response; handlers read it as
    `request.state.request_id`.

    Plain ASGI on purpose: Starlette's `BaseHTTPMiddleware` relays each chunk of a streamed response through a
    memory stream and an extra task, per token of every SSE stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        if not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class _KeyStore:
    """Accepted API keys, re-read when the key file changes (a rotated Secret needs no restart)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._mtime: float | None = None
        self._keys = settings.accepted_api_keys()  # fails startup on a missing key file
        if settings.api_key_file is not None:
            self._mtime = settings.api_key_file.stat().st_mtime

    def keys(self) -> frozenset[str]:
        path = self.settings.api_key_file
        if path is not None:
            try:
                mtime = path.stat().st_mtime
                if mtime != self._mtime:
                    self._keys, self._mtime = self.settings.accepted_api_keys(), mtime
            except OSError as e:
                log.error("cannot re-read API key file %s, keeping the previous keys: %s", path, e)
        return self._keys


@dataclass
class _State:
    settings: GatewaySettings
    client: aioredis.Redis
    tokenizer: Tokenizer
    encoder: ChatEncoder
    api_keys: _KeyStore
    prefill: WorkQueue
    decode: WorkQueue
    _stats: tuple[float, QueueStats] | None = field(default=None)
    _refresh: asyncio.Future[QueueStats] | None = field(default=None)

    async def prefill_stats(self) -> QueueStats:
        """The prefill queue's stats, at most `queue_stats_ttl_s` old; concurrent requests share one refresh."""
        if self._stats is not None and time.monotonic() - self._stats[0] <= self.settings.queue_stats_ttl_s:
            return self._stats[1]
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._fetch_stats())
        return await asyncio.shield(self._refresh)

    async def _fetch_stats(self) -> QueueStats:
        stats = await queue_stats(self.client, self.settings.deployment, keys.PREFILL_STREAM)
        self._stats = (time.monotonic(), stats)
        for gauge, value in (
            (metrics.QUEUE_LENGTH, stats.length),
            (metrics.QUEUE_LAG, stats.lag),
            (metrics.QUEUE_PENDING, stats.pending),
            (metrics.QUEUE_CONSUMERS, stats.consumers),
        ):
            gauge.labels(stream=keys.PREFILL_STREAM).set(value)
        return stats


@dataclass(frozen=True)
class _Prepared:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    stops: list[str]


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app; `settings` default to the environment and the mounted config file."""
    settings = settings or GatewaySettings()
    tokenizer = Tokenizer.from_pretrained(settings.model)
    api_keys = _KeyStore(settings)
    telemetry.setup_tracing(contract.Role.GATEWAY.value)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        password = settings.redis_password_value()
        client = connect(settings.redis_url, password)
        app.state.gw = _State(
            settings=settings,
            client=client,
            tokenizer=tokenizer,
            encoder=ChatEncoder(tokenizer),
            api_keys=api_keys,
            prefill=WorkQueue(client, settings.deployment, keys.PREFILL_STREAM),
            decode=WorkQueue(client, settings.deployment, keys.DECODE_STREAM),
        )
        try:
            yield
        finally:
            await client.aclose()
            telemetry.shutdown_tracing()

    app = FastAPI(title="dsv4 gateway", version="1", lifespan=lifespan)
    install_error_handlers(app, settings.retry_after_s)
    _document_served_model(app, settings.served_model_name)

    app.add_middleware(_RequestIdMiddleware)

    def state(request: Request) -> _State:
        gw: _State = request.app.state.gw
        return gw

    async def authorize(request: Request) -> None:  # async: FastAPI runs sync dependencies in a thread pool
        accepted = api_keys.keys()
        if not accepted:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in accepted:
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get(contract.HEALTH_PATH, include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(contract.READY_PATH, include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            await state(request).client.ping()
        except Exception as e:  # any failure means "not ready", never a 500
            return JSONResponse({"status": "unavailable", "reason": f"redis: {type(e).__name__}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get(contract.METRICS_PATH, include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(settings.served_model_name)]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(settings, model_id)
        return _model_card(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gw = state(request)
        _check_model(settings, body.model)
        tools = (
            [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else None
        )
        try:
            encoded = gw.encoder.encode(
                [m.model_dump(exclude_none=True) for m in body.messages],
                tools=tools,
                response_format=body.response_format,
                thinking_mode=body.thinking_mode(),
                reasoning_effort=body.reasoning_effort,
            )
        except ValueError as e:
            raise invalid(f"messages: {e}", param="messages") from e
        forced = _forced_tool_call(body)
        prompt_ids = encoded.token_ids + gw.tokenizer.encode(forced)
        prepared = _prepare(settings, gw, "chatcmpl-", prompt_ids, body, body.max_new_tokens())
        fmt = _ChatFormat(body, prepared.request_id, gw.tokenizer, forced)
        return await _serve(gw, request, prepared, "/v1/chat/completions", fmt)

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gw = state(request)
        _check_model(settings, body.model)
        if isinstance(body.prompt, str):
            ids = gw.tokenizer.encode(body.prompt)
        else:
            ids = list(body.prompt)
            if max(ids) >= gw.tokenizer.vocab_size:
                raise invalid(f"prompt: token id {max(ids)} is outside the vocabulary", param="prompt")
        if not ids:
            raise invalid("prompt is empty", param="prompt")
        prepared = _prepare(settings, gw, "cmpl-", ids, body, body.max_new_tokens())
        fmt = _TextFormat(body, prepared.request_id, gw.tokenizer)
        return await _serve(gw, request, prepared, "/v1/completions", fmt)

    return app


def _forced_tool_call(body: ChatCompletionRequest) -> str:
    """The assistant-turn start that enforces `tool_choice` "required" or a named function ("" otherwise).

    The block is opened in the prompt, so the model can only continue with tool calls (and, when named, inside
    that function's call); the arguments are not constrained to the schema. Thinking mode is refused: the block
    comes after the reasoning, whose end cannot be known in advance.
    """
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return ""
    if body.thinking_mode() == "thinking":
        raise invalid(
            "tool_choice 'required' or a named function cannot be enforced in thinking mode; "
            "use tool_choice 'auto' or turn thinking off",
            param="tool_choice",
        )
    return forced_tool_call_prefix(None if choice == "required" else choice.function.name)  # type: ignore[union-attr]


def _document_served_model(app: FastAPI, served: str) -> None:
    """Name the one served model in the OpenAPI document (other names are answered 404, as OpenAI does)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = base()
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [served]}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "dsv4"}


def _check_model(settings: GatewaySettings, model: str) -> None:
    if model != settings.served_model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this endpoint serves '{settings.served_model_name}'",
            param="model",
            code="model_not_found",
        )


def _prepare(
    settings: GatewaySettings,
    gw: _State,
    prefix: str,
    prompt_ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    max_new: int | None,
) -> _Prepared:
    room = settings.max_model_len - len(prompt_ids)
    if room < 1:
        raise invalid(
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {settings.max_model_len}",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_new is not None and max_new > room:
        raise invalid(
            f"max_tokens {max_new} + {len(prompt_ids)} prompt tokens exceed the context of {settings.max_model_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    sampling = SamplingSpec(
        max_tokens=max_new or min(settings.default_max_tokens, room),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.requested_logprobs(),
    )
    return _Prepared(prefix + uuid.uuid4().hex, prompt_ids, sampling, body.stop_list())


async def _enqueue(gw: _State, prepared: _Prepared, span: Span) -> PrefillDecision:
    stats = await gw.prefill_stats()
    decision = decide_prefill(len(prepared.prompt_ids), stats.lag, stats.consumers, gw.settings.disaggregation)
    placement = "disaggregated" if decision.disaggregate else "local"
    metrics.PREFILL_DECISIONS.labels(placement=placement, reason=decision.reason).inc()
    span.set_attribute(telemetry.ATTR_DISAGGREGATED, decision.disaggregate)
    span.set_attribute(telemetry.ATTR_DECISION_REASON, decision.reason)
    job = Job(
        prepared.request_id,
        tuple(prepared.prompt_ids),
        prepared.sampling,
        trace_context=telemetry.inject(),
        enqueued_at_ms=int(time.time() * 1000),
    )
    await (gw.prefill if decision.disaggregate else gw.decode).enqueue(job)
    return decision


def _queue_error(e: Exception, retry_after_s: int) -> APIError:
    if isinstance(e, RedisUnavailable):
        return unavailable("the request queue is unavailable; retry shortly", retry_after_s)
    if isinstance(e, TokenStreamTimeout):
        return APIError(504, "no worker produced tokens in time", code="timeout")
    if isinstance(e, TokenStreamFailed):
        status = 400 if e.code == "invalid_request" else 500
        return APIError(status, f"generation failed: {e}", code=e.code)
    if isinstance(e, TokenStreamGap):
        return APIError(500, f"generation failed: {e}", type="server_error", code="token_stream_gap")
    raise e


_QUEUE_ERRORS = (RedisUnavailable, TokenStreamTimeout, TokenStreamFailed, TokenStreamGap)


async def _serve(gw: _State, request: Request, prepared: _Prepared, endpoint: str, fmt: _Format) -> Response:
    """Enqueue, wait for the first event, then answer as one JSON body or as an SSE stream."""
    t0 = time.monotonic()
    span = telemetry.tracer().start_span(
        telemetry.SPAN_GATEWAY,
        context=telemetry.extract(request.headers),  # a caller's traceparent makes this span its child
        attributes={
            telemetry.ATTR_REQUEST_ID: prepared.request_id,
            "http.route": endpoint,
            "dsv4.client_request_id": request.state.request_id,
            telemetry.ATTR_PROMPT_TOKENS: len(prepared.prompt_ids),
        },
    )
    ctx = trace.set_span_in_context(span)
    token = otel_context.attach(ctx)
    try:
        await _enqueue(gw, prepared, span)
    except RedisUnavailable as e:
        _end_span(span, error=e)
        metrics.REQUESTS.labels(endpoint=endpoint, status="503").inc()
        raise _queue_error(e, gw.settings.retry_after_s) from e
    finally:
        otel_context.detach(token)
    metrics.PROMPT_TOKENS.inc(len(prepared.prompt_ids))
    events = text_stream(
        gw.client,
        gw.settings.deployment,
        prepared.request_id,
        len(prepared.prompt_ids),
        gw.tokenizer.detokenizer(skip_special_tokens=fmt.skip_special_tokens),
        prepared.stops,
        gw.settings.token_timeout_s,
    )
    timing = _Timing(t0)
    try:
        first = await anext(events)
    except _QUEUE_ERRORS as e:
        await events.aclose()
        err = _queue_error(e, gw.settings.retry_after_s)
        _end_span(span, error=e)
        metrics.REQUESTS.labels(endpoint=endpoint, status=str(err.status)).inc()
        raise err from e
    timing.event(first)

    if not fmt.stream:
        try:
            outputs = [first]
            async for ev in events:
                timing.event(ev)
                outputs.append(ev)
        except _QUEUE_ERRORS as e:
            err = _queue_error(e, gw.settings.retry_after_s)
            _end_span(span, error=e)
            metrics.REQUESTS.labels(endpoint=endpoint, status=str(err.status)).inc()
            raise err from e
        done = outputs[-1]
        assert isinstance(done, Done)
        deltas = [o for o in outputs if isinstance(o, TextDelta)]
        body = fmt.full("".join(d.text for d in deltas), done, [lp for d in deltas for lp in d.logprobs])
        _finish(span, timing, endpoint, "200", done)
        return JSONResponse(body)

    async def sse() -> AsyncIterator[bytes]:
        status = "499"  # the client went away before the end, unless set otherwise below
        done: Done | None = None
        try:
            for chunk in fmt.start():
                yield _sse(chunk)
            ev: TextDelta | Done = first
            while True:
                if isinstance(ev, TextDelta):
                    for chunk in fmt.delta(ev.text, ev.logprobs):
                        yield _sse(chunk)
                else:
                    done = ev
                    for chunk in fmt.end(ev):
                        yield _sse(chunk)
                    break
                ev = await anext(events)
                timing.event(ev)
            status = "200"
            yield b"data: [DONE]\n\n"
        except _QUEUE_ERRORS as e:
            # Headers are sent: the error travels as a final SSE event, the way OpenAI's API reports it.
            err = _queue_error(e, gw.settings.retry_after_s)
            status = str(err.status)
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, str(e)))
            yield _sse(err.body())
        finally:
            await events.aclose()
            _finish(span, timing, endpoint, status, done)

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Timing:
    """TTFT and inter-token latency, observed as text arrives."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.last: float | None = None
        self.tokens = 0

    def event(self, ev: TextDelta | Done) -> None:
        if not isinstance(ev, TextDelta) or ev.tokens == 0:
            return
        now = time.monotonic()
        if self.last is None:
            metrics.TTFT.observe(now - self.t0)
        else:
            metrics.ITL.observe((now - self.last) / ev.tokens)
        self.last = now
        self.tokens += ev.tokens


def _finish(span: Span, timing: _Timing, endpoint: str, status: str, done: Done | None) -> None:
    metrics.REQUESTS.labels(endpoint=endpoint, status=status).inc()
    metrics.REQUEST_SECONDS.observe(time.monotonic() - timing.t0)
    if done is not None:
        span.set_attribute(telemetry.ATTR_COMPLETION_TOKENS, done.usage.completion_tokens)
        span.set_attribute(telemetry.ATTR_FINISH_REASON, done.reason)
    _end_span(span)


def _end_span(span: Span, error: BaseException | None = None) -> None:
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


Logprobs = tuple[tuple[int, TokenLogprobs], ...]


class _Format:
    """How one endpoint turns generated text (and token logprobs) into response bodies and stream chunks."""

    skip_special_tokens = False

    def __init__(self, stream: bool, include_usage: bool, request_id: str, model: str, tokenizer: Tokenizer) -> None:
        self.stream = stream
        self.include_usage = include_usage
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str, logprobs: Logprobs) -> list[dict[str, Any]]:
        raise NotImplementedError

    def end(self, done: Done) -> list[dict[str, Any]]:
        raise NotImplementedError

    def full(self, text: str, done: Done, logprobs: list[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
        raise NotImplementedError

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text as OpenAI reports it (an incomplete UTF-8 sequence shows U+FFFD) and its raw bytes."""
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw

    def _usage(self, done: Done) -> dict[str, int]:
        u = done.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }

    def _usage_chunk(self, obj: str, done: Done) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                 "usage": self._usage(done)}]  # fmt: skip


class _ChatFormat(_Format):
    def __init__(self, body: ChatCompletionRequest, request_id: str, tokenizer: Tokenizer, forced: str = "") -> None:
        include = bool(body.stream_options and body.stream_options.include_usage)
        super().__init__(body.stream, include, request_id, body.model, tokenizer)
        self.parser = CompletionStreamParser(body.thinking_mode())
        self.tool_calls = 0
        # A forced tool-call start is in the prompt, not the output: the parser reads it as the output's start.
        self._forced_events = self.parser.feed(forced) if forced else []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, logprobs: Sequence[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text, raw = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        content = [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for t, lp in logprobs]
        return {"content": content, "refusal": None}

    def _events(self, events: list[DeltaEvent]) -> list[dict[str, Any]]:
        out = []
        for e in events:
            if e.kind == "tool_call":
                self.tool_calls += 1
            if e.text or e.kind == "tool_call":
                out.append(self._chunk(e.to_openai_delta()))
        return out

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}), *self._events(self._forced_events)]

    def delta(self, text: str, logprobs: Logprobs) -> list[dict[str, Any]]:
        chunks = self._events(self.parser.feed(text)) if text else []
        if logprobs:  # on the delta's first chunk; a token whose text is still held back gets a chunk of its own
            if not chunks:
                chunks.append(self._chunk({}))
            chunks[0]["choices"][0]["logprobs"] = self._logprobs(logprobs)
        return chunks

    def _reason(self, done: Done) -> str:
        return "tool_calls" if self.tool_calls and done.reason == "stop" else done.reason

    def end(self, done: Done) -> list[dict[str, Any]]:
        chunks = self._events(self.parser.finish())
        chunks.append(self._chunk({}, self._reason(done)))
        return chunks + self._usage_chunk("chat.completion.chunk", done)

    def full(self, text: str, done: Done, logprobs: list[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
        self.parser.feed(text)
        self.parser.finish()
        message = self.parser.result.to_openai_message()
        self.tool_calls = len(self.parser.result.tool_calls)
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": self._reason(done),
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(done),
        }


class _TextFormat(_Format):
    skip_special_tokens = True

    def __init__(self, body: CompletionRequest, request_id: str, tokenizer: Tokenizer) -> None:
        include = bool(body.stream_options and body.stream_options.include_usage)
        super().__init__(body.stream, include, request_id, body.model, tokenizer)
        self.offset = 0  # text_offset of the next token

    def _chunk(self, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, logprobs: Sequence[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
        tokens, offsets = [], []
        for token_id, _ in logprobs:
            text, _raw = self._token(token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for _, lp in logprobs],
            "top_logprobs": [{self._token(i)[0]: v for i, v in lp.top} for _, lp in logprobs],
            "text_offset": offsets,
        }

    def delta(self, text: str, logprobs: Logprobs) -> list[dict[str, Any]]:
        if not text and not logprobs:
            return []
        return [self._chunk(text, None, self._logprobs(logprobs) if logprobs else None)]

    def end(self, done: Done) -> list[dict[str, Any]]:
        return [self._chunk("", done.reason), *self._usage_chunk("text_completion", done)]

    def full(self, text: str, done: Done, logprobs: list[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": self._logprobs(logprobs) if logprobs else None,
                         "finish_reason": done.reason}],
            "usage": self._usage(done),
        }  # fmt: skip
