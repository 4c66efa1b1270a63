"""`AsyncEngine`: the engine as the serving workers use it (`dsv4.model_runtime.engine.port.Engine`).

One background thread owns the `LLMEngine` and steps it whenever it has work; coroutines only post commands to
that thread and await futures or per-request queues, so the worker's event loop never blocks on the model.
A request without a seed gets one derived from its request id, so a decode that another worker resumes or
recomputes draws the same tokens (the port's determinism contract).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from dsv4.model_runtime.engine.port import (
    EngineStats,
    KVImportError,
    KVMeta,
    PrefillOutput,
    PrefixEvent,
    SamplingSpec,
    TokenLogprobs,
    TokenOutput,
)
from dsv4.model_runtime.engine.request import Request, TokenLogprob
from dsv4.model_runtime.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

CANCELLED_TOKEN_ID = -1  # token_id of the closing TokenOutput of a cancelled stream (it carries no token)

T = TypeVar("T")


class RequestCancelled(RuntimeError):
    """A prefill that was cancelled before its first token."""


def request_seed(request_id: str) -> int:
    """The seed of a request that did not ask for one: stable across workers and processes."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class _Caller:
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue[TokenOutput] | None = None
    prefill: asyncio.Future[PrefillOutput] | None = None
    accepted: asyncio.Future[None] | None = None
    done: bool = False
    history: list[TokenOutput] = field(default_factory=list)


class AsyncEngine:
    """Implements `dsv4.model_runtime.engine.port.Engine` over a background-stepped `LLMEngine`."""

    def __init__(self, engine: LLMEngine, kv_chunk_size: int = kv_export.CHUNK_SIZE) -> None:
        self._engine = engine
        self._chunk_size = kv_chunk_size
        self._fingerprint = engine.fingerprint
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._requests: dict[str, _Caller] = {}
        self._lock = threading.Lock()
        self._outbox: dict[asyncio.AbstractEventLoop, list[Callable[[], object]]] = {}  # engine thread only
        self._prefix_events: queue.SimpleQueue[PrefixEvent] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        qat_simulation: bool = True,
        config: EngineConfig | None = None,
    ) -> AsyncEngine:
        """Load the checkpoint folder and start the stepping thread."""
        return cls(LLMEngine.from_path(path, device=device, dtype=dtype, qat_simulation=qat_simulation, config=config))

    # ---- Engine protocol ---------------------------------------------------------------------------------------
    @property
    def model_fingerprint(self) -> str:
        return self._fingerprint

    @property
    def kv_format_version(self) -> int:
        return kv_export.FORMAT_VERSION

    async def prefill(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingSpec) -> PrefillOutput:
        """Prefill, sample token 0 and export the KV state (the request's blocks are freed once exported)."""
        loop = asyncio.get_running_loop()
        req = self._register(request_id, loop)
        req.prefill = loop.create_future()
        params = self._params(request_id, sampling)
        self._post(lambda: self._add(request_id, prompt_ids, params, export=True))
        try:
            return await req.prefill
        except asyncio.CancelledError:  # the caller gave up: stop computing it
            self._post(lambda: self._engine.abort(request_id))
            raise
        finally:
            self._forget(request_id)

    async def submit_decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingSpec,
        *,
        kv_blob: bytes | None,
        streamed_ids: Sequence[int],
    ) -> None:
        """Admit a decode: import `kv_blob` and replay `streamed_ids`, or (no blob) prefill prompt + streamed ids."""
        loop = asyncio.get_running_loop()
        snapshot = None
        if kv_blob is not None:
            if not streamed_ids:
                raise ValueError(f"request {request_id}: a KV blob needs the streamed token 0 to continue from")
            snapshot = await loop.run_in_executor(None, kv_export.load, self._engine.model, kv_blob)
            if snapshot.position != len(prompt_ids):
                raise KVImportError(
                    f"KV state of request {request_id} covers {snapshot.position} positions, "
                    f"the prompt has {len(prompt_ids)}"
                )
        req = self._register(request_id, loop)
        req.tokens = asyncio.Queue()
        req.accepted = loop.create_future()
        params = self._params(request_id, sampling)
        self._post(lambda: self._add(request_id, prompt_ids, params, streamed=streamed_ids, snapshot=snapshot))
        try:
            await req.accepted
        except BaseException:
            self._forget(request_id)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[TokenOutput]:
        """The decode's tokens in index order; the last one has `finish_reason` set."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is None or req.tokens is None:
            raise KeyError(f"no decode request {request_id!r} in this engine")
        try:
            while True:
                out = await req.tokens.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if req.done:
                self._forget(request_id)

    async def cancel(self, request_id: str) -> None:
        """Stop the request and free its state; idempotent."""
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def abort() -> None:
            out = self._engine.abort(request_id)
            if out is not None:
                self._deliver(out)
                self._flush_outbox()
            _call_in(loop, _resolve, done, None)

        self._post(abort)
        await done

    def stats(self) -> EngineStats:
        e = self._engine
        return EngineStats(
            running_requests=e.num_running,
            waiting_requests=e.num_waiting,
            kv_cache_used_blocks=e.kv.used_blocks,
            kv_cache_total_blocks=e.kv.total_blocks,
            extra=e.stats_extra(),
        )

    # ---- prefix cache --------------------------------------------------------------------------------------------
    @property
    def prefix_block_size(self) -> int | None:
        return self._engine.prefix_block_size

    async def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        """Leading positions of `prompt_ids` the cache holds now."""
        ids = list(prompt_ids)
        return await self._on_engine(lambda: self._engine.cached_prefix_len(ids))

    async def import_prefix(self, token_ids: Sequence[int], blob: bytes) -> bool:
        """Verify `blob` (in an executor), then cache it as the state of `token_ids`; KVImportError when refused."""
        loop = asyncio.get_running_loop()
        snapshot = await loop.run_in_executor(None, kv_export.load, self._engine.model, blob)
        if snapshot.position != len(token_ids):
            raise KVImportError(f"prefix state covers {snapshot.position} positions, the prefix has {len(token_ids)}")
        ids = list(token_ids)
        return await self._on_engine(lambda: self._engine.import_prefix(ids, snapshot))

    async def export_prefix(self, chain_hash: str) -> bytes | None:
        """The blob of a held aligned prefix (exported on the engine thread, so no eviction interleaves)."""
        chunks = await self._on_engine(lambda: self._engine.export_prefix(chain_hash, self._chunk_size))
        return None if chunks is None else b"".join(chunks)

    def prefix_events(self) -> list[PrefixEvent]:
        events = []
        while True:
            try:
                events.append(self._prefix_events.get_nowait())
            except queue.Empty:
                return events

    async def held_prefixes(self) -> list[str]:
        return await self._on_engine(self._engine.held_prefixes)

    async def _on_engine(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except Exception as e:
                _call_in(loop, _fail, fut, e)
                return
            finally:
                self._collect_prefix_events()
            _call_in(loop, _resolve, fut, result)

        self._post(run)
        return await fut

    def _collect_prefix_events(self) -> None:
        for event in self._engine.prefix_events():
            self._prefix_events.put(event)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the stepping thread (pending requests are abandoned)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- caller side -------------------------------------------------------------------------------------------
    def _params(self, request_id: str, spec: SamplingSpec) -> SamplingParams:
        params = SamplingParams.from_spec(spec)
        return params if params.seed is not None else replace(params, seed=request_seed(request_id))

    def _register(self, request_id: str, loop: asyncio.AbstractEventLoop) -> _Caller:
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already live in this engine")
            req = self._requests[request_id] = _Caller(loop)
        return req

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def _post(self, command: Callable[[], object]) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if not self._engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self._engine.step()
            except Exception as e:  # never leave a caller waiting forever on a dead engine
                log.exception("engine step failed; failing all live requests")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out)
            self._flush_outbox()
            self._collect_prefix_events()

    def _add(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        export: bool = False,
        streamed: Sequence[int] = (),
        snapshot: kv_export.KVSnapshot | None = None,
    ) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        waiter = req.prefill if export else req.accepted
        try:
            self._engine.add_request(
                request_id,
                prompt_ids,
                params,
                output_token_ids=streamed,
                snapshot=snapshot,
                export_after_prefill=export,
            )
        except Exception as e:
            if waiter is not None:
                _call_in(req.loop, _fail, waiter, e)
            return
        if not export and waiter is not None:
            _call_in(req.loop, _resolve, waiter, None)

    def _deliver(self, out: RequestOutput) -> None:
        req = self._requests.get(out.request_id)
        exported = self._engine.exported.pop(out.request_id, None) if out.finished else None
        if req is None:  # the caller went away: nothing to hand over
            if exported is not None:
                self._engine.release(exported)
            return
        if req.prefill is not None:
            self._finish_prefill(req, out, exported)
            return
        if req.tokens is None:
            return
        items = [
            TokenOutput(
                index=out.first_index + k,
                token_id=t,
                finish_reason=_reason(out.finish_reason) if out.finished and k == len(out.token_ids) - 1 else None,
                logprobs=_port_logprobs(out.logprobs[k]) if k < len(out.logprobs) else None,
            )
            for k, t in enumerate(out.token_ids)
        ]
        if out.finished and not out.token_ids:
            items.append(TokenOutput(out.first_index, CANCELLED_TOKEN_ID, _reason(out.finish_reason)))
        req.done = out.finished
        self._outbox.setdefault(req.loop, []).extend(functools.partial(req.tokens.put_nowait, i) for i in items)

    def _flush_outbox(self) -> None:
        # One wake-up of each caller loop per step, not one per token: each call_soon_threadsafe writes to the
        # loop's self-pipe, and a worker's loop woken 16 times a step took the GIL from this thread as often.
        outbox, self._outbox = self._outbox, {}
        for loop, calls in outbox.items():
            _call_in(loop, _run_all, calls)

    def _finish_prefill(self, req: _Caller, out: RequestOutput, seq: Request | None) -> None:
        assert req.prefill is not None
        if out.finish_reason == "cancelled" or seq is None:
            _call_in(req.loop, _fail, req.prefill, RequestCancelled(f"prefill {out.request_id} cancelled"))
            return
        try:
            assert seq.state is not None
            chunks = self._engine.runner.export_chunks(seq.state, self._chunk_size, seq.draft)
        except Exception as e:
            _call_in(req.loop, _fail, req.prefill, e)
            return
        finally:
            self._engine.release(seq)
        meta = KVMeta(
            format_version=kv_export.FORMAT_VERSION,
            model_fingerprint=self._fingerprint,
            total_bytes=sum(len(c) for c in chunks),
            num_tokens=len(seq.prompt_token_ids),
        )
        result = PrefillOutput(
            first_token=seq.output_token_ids[0],
            kv_meta=meta,
            kv_chunks=iter(chunks),
            prompt_tokens=len(seq.prompt_token_ids),
            first_token_logprobs=_port_logprobs(seq.logprobs[0]) if seq.logprobs else None,
        )
        _call_in(req.loop, _resolve, req.prefill, result)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._requests):
            out = self._engine.abort(request_id)
            req = self._requests.get(request_id)
            if req is None:
                continue
            if req.prefill is not None:
                _call_in(req.loop, _fail, req.prefill, error)
            elif req.tokens is not None and out is not None:
                req.done = True
                item = TokenOutput(out.first_index, CANCELLED_TOKEN_ID, "error")
                _call_in(req.loop, req.tokens.put_nowait, item)


def _port_logprobs(lp: TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(lp.logprob, lp.top)


def _reason(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "cancelled", "error") else "stop"


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Run `fn(*args)` on a caller's loop, from the engine thread; a loop that has closed has nobody left to tell
    (and must not take the engine thread down with it)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.warning("a caller's event loop is closed; dropped a call to %s", getattr(fn, "__name__", fn))


def _run_all(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
