"""From a request's token stream to text: detokenize, cut at stop strings, count tokens, cancel when done early."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from dsv4.model_runtime.dsml import find_stop, held_back
from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.model_runtime.tokenizer import IncrementalDetokenizer
from dsv4.protocol.connection import RedisUnavailable
from dsv4.services.queues import Finish, TokenChunk, TokenReader, Usage, request_cancel

log = logging.getLogger(__name__)


class StopMatcher:
    """Streams text up to the earliest stop string, holding back tails that may still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add text; returns what can be sent now. After a stop string was seen, `stopped` is True."""
        if self.stopped:
            return ""
        self._text += delta
        if self.stops:
            hit = find_stop(self._text, self._sent, self.stops, final)
            if hit is not None:
                out = self._text[self._sent : hit[0]]
                self._sent = len(self._text)
                self.stopped = True
                return out
        end = len(self._text) if final else len(self._text) - held_back(self._text, self._sent, self.stops)
        out = self._text[self._sent : end]
        self._sent = end
        return out


@dataclass(frozen=True)
class TextDelta:
    """New text (possibly empty), how many tokens it took, and those tokens with their logprobs when the workers
    sent them (a token whose logprobs are unknown is left out)."""

    text: str
    tokens: int
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()


@dataclass(frozen=True)
class Done:
    """End of generation: finish reason ("stop", "length", …) and usage."""

    reason: str
    usage: Usage


async def text_stream(
    client: aioredis.Redis,
    deployment: str,
    request_id: str,
    prompt_tokens: int,
    detokenizer: IncrementalDetokenizer,
    stops: Sequence[str],
    token_timeout_s: float,
) -> AsyncGenerator[TextDelta | Done, None]:
    """Text deltas of a request, then Done. Queue errors propagate (TokenStreamGap/Failed/Timeout,
    RedisUnavailable). If the consumer stops early (stop string, client gone, error) the workers are told to cancel
    and the token stream is deleted."""
    reader = TokenReader(client, deployment, request_id)
    matcher = StopMatcher(stops)
    finished = False
    generated = 0
    try:
        async for event in reader.events(token_timeout_s):
            if isinstance(event, TokenChunk):
                generated += len(event.token_ids)
                text = matcher.feed(detokenizer.add_many(event.token_ids))
                logprobs = tuple(zip(event.token_ids, event.logprobs, strict=True)) if event.logprobs else ()
                yield TextDelta(text, len(event.token_ids), logprobs)
                if matcher.stopped:
                    yield Done("stop", Usage(prompt_tokens, generated))
                    return
            elif isinstance(event, Finish):
                finished = True
                tail = matcher.feed(detokenizer.finish(), final=True)
                if tail:
                    yield TextDelta(tail, 0)
                yield Done(event.reason, event.usage)
                return
    finally:
        await _cleanup(client, deployment, request_id, reader, cancel=not finished)


async def _cleanup(client: aioredis.Redis, deployment: str, request_id: str, reader: TokenReader, cancel: bool) -> None:
    try:
        if cancel:
            await request_cancel(client, deployment, request_id)
        await reader.close()
    except RedisUnavailable as e:
        log.warning("cleanup of request %s skipped (its keys expire): %s", request_id, e)
