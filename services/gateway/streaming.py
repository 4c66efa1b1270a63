"""From a request's token stream to text: detokenize, cut at stop strings, count tokens, cancel when done early."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.model_runtime.engine.text_stream import TextStream
from dsv4.protocol.connection import RedisUnavailable
from dsv4.services.token_stream import Finish, TokenChunk, TokenReader, Usage

log = logging.getLogger(__name__)


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
    reader: TokenReader, text: TextStream, prompt_tokens: int, token_timeout_s: float
) -> AsyncGenerator[TextDelta | Done, None]:
    """Text deltas of a request, then Done. Queue errors propagate (TokenStreamGap/Failed/Timeout, RequestLost,
    RedisUnavailable). If the consumer stops early (stop string, client gone, error) the workers are told to cancel;
    the token stream and the request's lease are deleted in every case."""
    finished = False
    generated = 0
    try:
        async for event in reader.events(token_timeout_s):
            if isinstance(event, TokenChunk):
                generated += len(event.token_ids)
                text.add_many(event.token_ids)
                logprobs = tuple(zip(event.token_ids, event.logprobs, strict=True)) if event.logprobs else ()
                yield TextDelta(text.delta(), len(event.token_ids), logprobs)
                if text.stopped:
                    yield Done("stop", Usage(prompt_tokens, generated))
                    return
            elif isinstance(event, Finish):
                finished = True
                text.finish()
                tail = text.delta(final=True)
                if tail:
                    yield TextDelta(tail, 0)
                yield Done(event.reason, event.usage)
                return
    finally:
        await _cleanup(reader, cancel=not finished)


async def _cleanup(reader: TokenReader, cancel: bool) -> None:
    try:
        if cancel:
            await reader.cancel()
        await reader.close()
    except RedisUnavailable as e:
        log.warning("cleanup of request %s skipped (its keys expire): %s", reader.request_id, e)
