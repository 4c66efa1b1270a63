"""One OpenAI request through the queues: prepare (context and sampling) → enqueue (prefill decision, job and
lease in one transaction) → stream (the first event decides the status; then one JSON body or an SSE stream).

A request with `n` > 1 or several prompts fans out (`fan_out`): each choice is a queue request of its own, with
its own span and metrics, enqueued together; the response merges them. Every way a choice ends goes through
`_Call.finish`: the requests metric, the request duration and the end of the `gateway.request` span happen exactly
once, and a queue failure becomes the client's error in `_Call.fail` alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.model_runtime.engine.text_stream import TextStream
from dsv4.protocol.connection import RedisUnavailable, unavailable_as_typed
from dsv4.services import metrics, telemetry
from dsv4.services.gateway.decision import decide_prefill
from dsv4.services.gateway.errors import APIError, invalid, unavailable
from dsv4.services.gateway.openai_format import SSE_DONE, OpenAIFormat, sse_event
from dsv4.services.gateway.routing import Route
from dsv4.services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.gateway.state import GatewayState
from dsv4.services.gateway.streaming import Done, TextDelta, text_stream
from dsv4.services.token_stream import (
    RequestLost,
    TokenReader,
    TokenStreamFailed,
    TokenStreamGap,
    TokenStreamTimeout,
    Usage,
)
from dsv4.services.work_queue import Job

QUEUE_UNAVAILABLE = "the request queue is unavailable; retry shortly"
_QUEUE_ERRORS = (RedisUnavailable, RequestLost, TokenStreamTimeout, TokenStreamFailed, TokenStreamGap)
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to enqueue."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    stops: list[str]


def prepare(
    settings: GatewaySettings,
    prefix: str,
    prompt_ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    max_new: int | None,
    vocab_size: int,
) -> Prepared:
    """Check the prompt and `max_new` against the context, and the logit_bias ids against the vocabulary of
    `vocab_size` tokens, and turn the body's sampling fields into a SamplingSpec; a 400 naming the parameter
    otherwise."""
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
    bias = body.bias_pairs()
    outside = [t for t, _ in bias if t >= vocab_size]
    if outside:
        raise invalid(f"logit_bias: token id {outside[0]} is outside the vocabulary", param="logit_bias")
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
        logit_bias=bias,
    )
    return Prepared(prefix + uuid.uuid4().hex, prompt_ids, sampling, body.stop_list())


def queue_error(e: Exception, retry_after_s: int) -> APIError:
    """The client's error for a failure of the queues or the workers."""
    if isinstance(e, RedisUnavailable):
        return unavailable(QUEUE_UNAVAILABLE, retry_after_s)
    if isinstance(e, RequestLost):
        return unavailable("the request queue restarted and lost this request; retry it", retry_after_s)
    if isinstance(e, TokenStreamTimeout):
        return APIError(504, "no worker produced tokens in time", code="timeout")
    if isinstance(e, TokenStreamFailed):
        status = 400 if e.code == "invalid_request" else 500
        return APIError(status, f"generation failed: {e}", code=e.code)
    if isinstance(e, TokenStreamGap):
        return APIError(500, f"generation failed: {e}", type="server_error", code="token_stream_gap")
    raise e


class _Call:
    """One request's span, latency metrics and final status, recorded once whichever way it ends."""

    def __init__(self, request: Request, prepared: Prepared, endpoint: str) -> None:
        self.t0 = time.monotonic()
        self.endpoint = endpoint
        self.span: Span = telemetry.tracer().start_span(
            telemetry.SPAN_GATEWAY,
            context=telemetry.extract(request.headers),  # a caller's traceparent makes this span its child
            attributes={
                telemetry.ATTR_REQUEST_ID: prepared.request_id,
                "http.route": endpoint,
                "dsv4.client_request_id": request.state.request_id,
                telemetry.ATTR_PROMPT_TOKENS: len(prepared.prompt_ids),
            },
        )
        self._last: float | None = None
        self._ended = False

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the span the current one inside the block (the job's trace context is injected from it)."""
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def event(self, ev: TextDelta | Done) -> None:
        """Observe TTFT on the first token-bearing delta, inter-token latency on the later ones."""
        if not isinstance(ev, TextDelta) or ev.tokens == 0:
            return
        now = time.monotonic()
        if self._last is None:
            metrics.TTFT.observe(now - self.t0)
        else:
            metrics.ITL.observe((now - self._last) / ev.tokens)
        self._last = now

    def finish(self, status: str, done: Done | None = None, error: BaseException | None = None) -> None:
        """Count the request with `status` and end the span; later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        metrics.REQUESTS.labels(endpoint=self.endpoint, status=status).inc()
        metrics.REQUEST_SECONDS.observe(time.monotonic() - self.t0)
        if done is not None:
            self.span.set_attribute(telemetry.ATTR_COMPLETION_TOKENS, done.usage.completion_tokens)
            self.span.set_attribute(telemetry.ATTR_FINISH_REASON, done.reason)
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
        self.span.end()

    def fail(self, e: Exception, retry_after_s: int) -> APIError:
        """The client's error for the queue failure `e`, with the request finished under its status."""
        err = queue_error(e, retry_after_s)
        self.finish(str(err.status), error=e)
        return err


async def _enqueue(gw: GatewayState, prepared: Prepared, reader: TokenReader, span: Span) -> Route:
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
    queue = gw.prefill if decision.disaggregate else gw.decode
    router = gw.routers[queue.stream]
    route = router.choose(prepared.prompt_ids)
    metrics.ROUTES.labels(pool=queue.stream, reason=route.reason).inc()
    span.set_attribute(telemetry.ATTR_ROUTE_WORKER, route.worker or "")
    span.set_attribute(telemetry.ATTR_ROUTE_REASON, route.reason)
    span.set_attribute(telemetry.ATTR_ROUTE_MATCHED_TOKENS, route.matched_tokens)
    try:
        with unavailable_as_typed(f"enqueueing into {queue.stream}"):
            async with gw.client.pipeline(transaction=True) as p:
                reader.take_lease(p)
                queue.enqueue_in(p, job, to=route.worker)
                await p.execute()
    except BaseException:
        router.done(route)
        raise
    return route


def fan_out(prepared: list[Prepared], n: int) -> list[Prepared]:
    """The queue requests of a body with these prompts (one `Prepared` each) and `n` choices per prompt: choice
    p * n + j is prompt p's j-th (OpenAI's and vLLM's order). With several choices their request ids are the first
    one's plus "-<choice>", and a seeded body seeds choice j with seed + j (as vLLM seeds parallel samples), so
    the choices differ and each stays reproducible."""
    if len(prepared) == 1 and n == 1:
        return prepared
    base = prepared[0].request_id
    out = []
    for p, one in enumerate(prepared):
        for j in range(n):
            seed = None if one.sampling.seed is None else one.sampling.seed + j
            sampling = dataclasses.replace(one.sampling, seed=seed)
            out.append(dataclasses.replace(one, request_id=f"{base}-{p * n + j}", sampling=sampling))
    return out


@dataclass
class _Open:
    """A choice whose request is queued and whose first event has arrived."""

    prepared: Prepared
    fmt: OpenAIFormat
    call: _Call
    events: AsyncGenerator[TextDelta | Done, None]
    first: TextDelta | Done

    async def abandon(self) -> None:
        """Stop the choice (its workers are told to cancel) and finish its call as the client's going away."""
        await self.events.aclose()
        self.call.finish("499")


async def _open(gw: GatewayState, request: Request, prepared: Prepared, endpoint: str, fmt: OpenAIFormat) -> _Open:
    """Enqueue one choice and wait for its first event; a queue failure is the client's APIError."""
    call = _Call(request, prepared, endpoint)
    reader = TokenReader(gw.client, gw.settings.deployment, prepared.request_id)
    text = TextStream(gw.tokenizer, prepared.stops, skip_special_tokens=fmt.skip_special_tokens)
    events = text_stream(reader, text, len(prepared.prompt_ids), gw.settings.token_timeout_s)
    try:
        with call.current():
            route = await _enqueue(gw, prepared, reader, call.span)
        metrics.PROMPT_TOKENS.inc(len(prepared.prompt_ids))
        # The generator closes itself when it raises or ends: an error here leaves nothing to clean up.
        try:
            first = await anext(events)
        finally:  # the prefill is over (or abandoned): it no longer loads the worker it was routed to
            gw.routers[route.pool].done(route)
        call.event(first)
    except _QUEUE_ERRORS as e:
        raise call.fail(e, gw.settings.retry_after_s) from e
    except asyncio.CancelledError:
        call.finish("499")
        raise
    except Exception as e:
        call.finish("500", error=e)
        raise
    return _Open(prepared, fmt, call, events, first)


async def _rest(o: _Open, retry_after_s: int) -> tuple[_Open, list[TextDelta | Done]]:
    """The choice and all its events, its first included (a response that is not streamed)."""
    outputs = [o.first]
    try:
        async for ev in o.events:
            o.call.event(ev)
            outputs.append(ev)
    except _QUEUE_ERRORS as e:
        raise o.call.fail(e, retry_after_s) from e
    except asyncio.CancelledError:
        o.call.finish("499")
        raise
    except Exception as e:
        o.call.finish("500", error=e)
        raise
    return o, outputs


async def _all(runs: list[Coroutine[Any, Any, T]], abandon: Callable[[T], Awaitable[None]]) -> list[T]:
    """Run `runs` concurrently; when one fails (or the caller is cancelled) the others are cancelled, and `abandon`
    takes what they had finished, before the failure propagates."""
    tasks = [asyncio.ensure_future(r) for r in runs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(result, BaseException):
                await abandon(result)
        raise


def _usage(dones: list[Done], n: int) -> Usage:
    """The usage of the whole response: each prompt counted once (its first choice's), every choice's tokens."""
    prompt = sum(d.usage.prompt_tokens for i, d in enumerate(dones) if i % n == 0)
    return Usage(prompt, sum(d.usage.completion_tokens for d in dones))


async def serve(
    gw: GatewayState, request: Request, choices: Sequence[tuple[Prepared, OpenAIFormat]], endpoint: str, n: int
) -> Response:
    """Enqueue every choice (`fan_out`: `n` per prompt), wait for each one's first event, then answer as one JSON
    body or as one SSE stream that carries every choice's chunks as they come. A choice that fails fails the
    request, and the others are cancelled."""
    retry_after_s = gw.settings.retry_after_s

    opened = await _all([_open(gw, request, p, endpoint, fmt) for p, fmt in choices], _Open.abandon)
    fmt = opened[0].fmt
    if fmt.stream:
        return StreamingResponse(
            _sse(opened, n, retry_after_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def undelivered(result: tuple[_Open, list[TextDelta | Done]]) -> None:
        result[0].call.finish("499")  # generated, but the response failed

    results = await _all([_rest(o, retry_after_s) for o in opened], undelivered)
    bodies, dones = [], []
    for o, outputs in results:
        done = outputs[-1]
        assert isinstance(done, Done)
        deltas = [d for d in outputs if isinstance(d, TextDelta)]
        bodies.append(o.fmt.full("".join(d.text for d in deltas), done, [lp for d in deltas for lp in d.logprobs]))
        dones.append(done)
        o.call.finish("200", done)
    body = {**bodies[0], "choices": [b["choices"][0] for b in bodies]}
    body["usage"] = opened[0].fmt.usage_body(_usage(dones, n))
    return JSONResponse(body)


async def _sse(opened: list[_Open], n: int, retry_after_s: int) -> AsyncIterator[bytes]:
    """Every choice's chunks as they come (each choice's in its order), then the usage when asked for, then
    [DONE]. A queue failure of one choice ends the stream with an error event; whatever has not finished when the
    stream ends (the client gone, a failure) is cancelled."""
    # bounded, so that a slow client holds the choices' reading back as it held a single stream's
    merged: asyncio.Queue[tuple[int, TextDelta | Done | Exception]] = asyncio.Queue(maxsize=16 * len(opened))

    async def pump(i: int, o: _Open) -> None:
        try:
            async for ev in o.events:
                o.call.event(ev)
                await merged.put((i, ev))
        except Exception as e:  # the stream below reports it (a queue failure) or raises it
            await merged.put((i, e))

    dones: dict[int, Done] = {}
    pumps: list[asyncio.Task[None]] = []
    try:
        for o in opened:
            for chunk in o.fmt.start():
                yield sse_event(chunk)
        for i, o in enumerate(opened):
            merged.put_nowait((i, o.first))
        pumps = [asyncio.create_task(pump(i, o)) for i, o in enumerate(opened) if not isinstance(o.first, Done)]
        while len(dones) < len(opened):
            i, ev = await merged.get()
            o = opened[i]
            if isinstance(ev, _QUEUE_ERRORS):
                # Headers are sent: the error travels as a final SSE event, the way OpenAI's API reports it.
                yield sse_event(o.call.fail(ev, retry_after_s).body())
                return
            if isinstance(ev, Exception):
                o.call.finish("500", error=ev)
                raise ev
            if isinstance(ev, TextDelta):
                for chunk in o.fmt.delta(ev.text, ev.logprobs):
                    yield sse_event(chunk)
                continue
            dones[i] = ev
            for chunk in o.fmt.end(ev):
                yield sse_event(chunk)
        for chunk in opened[0].fmt.usage_chunks(_usage([dones[i] for i in range(len(opened))], n)):
            yield sse_event(chunk)
        yield SSE_DONE
    finally:
        for t in pumps:
            t.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for i, o in enumerate(opened):
            await o.events.aclose()
            if i in dones:
                o.call.finish("200", dones[i])
            else:  # the client went away before this choice's end, or another choice failed (already finished)
                o.call.finish("499")
