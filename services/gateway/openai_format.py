"""OpenAI's response shapes: generated text (and token logprobs) as chat and text completions, whole or streamed.

A format object is made per choice (`index`; a request with `n` > 1 or several prompts has several, which share
the response id) and fed the generation as it arrives: `start()` once, `delta(...)` per piece of text, `end(done)`
at the end (streamed, each returns the chunks to send as SSE events; `usage_chunks` once for the whole response),
or `full(...)` once with everything (a whole response body of that one choice). `ChatFormat` parses the text into
reasoning, content and tool calls (`model_runtime.chat_parsing`); `TextFormat` reports text offsets of its
logprobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from dsv4.model_runtime.chat_parsing import CompletionStreamParser, DeltaEvent
from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from dsv4.services.gateway.streaming import Done
from dsv4.services.token_stream import Usage

Logprobs = Sequence[tuple[int, TokenLogprobs]]

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as compact JSON (non-ASCII text as is, as OpenAI sends it)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def model_card(model_id: str, max_model_len: int) -> dict[str, Any]:
    """An entry of `GET /v1/models`, with the context the gateway admits (vLLM's `max_model_len` field)."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "dsv4", "max_model_len": max_model_len}


class OpenAIFormat:
    """How one endpoint turns generated text (and token logprobs) into response bodies and stream chunks."""

    skip_special_tokens = False  # whether the text of special tokens is left out of the response
    chunk_object = ""  # the "object" of the endpoint's stream chunks

    def __init__(
        self, stream: bool, include_usage: bool, request_id: str, model: str, tokenizer: Tokenizer, index: int
    ) -> None:
        self.stream = stream
        self.include_usage = include_usage
        self.id = request_id
        self.index = index
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer

    def start(self) -> list[dict[str, Any]]:
        """The chunks that open a stream."""
        return []

    def delta(self, text: str, logprobs: Logprobs) -> list[dict[str, Any]]:
        """The chunks for new text and the logprobs of the tokens that brought it."""
        raise NotImplementedError

    def end(self, done: Done) -> list[dict[str, Any]]:
        """The chunks that close this choice's stream: the finish reason."""
        raise NotImplementedError

    def usage_chunks(self, usage: Usage) -> list[dict[str, Any]]:
        """The chunk that reports the usage of the whole response, when the client asked for it."""
        if not self.include_usage:
            return []
        return [{**self._envelope(self.chunk_object, []), "usage": self.usage_body(usage)}]

    def full(self, text: str, done: Done, logprobs: Logprobs) -> dict[str, Any]:
        """The whole response body of a request that is not streamed."""
        raise NotImplementedError

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's text as OpenAI reports it (an incomplete UTF-8 sequence shows U+FFFD) and its raw bytes."""
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw

    def usage_body(self, u: Usage) -> dict[str, int]:
        """OpenAI's `usage` object."""
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _stream_chunk(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = self._envelope(obj, [choice])
        if self.include_usage:  # OpenAI sends "usage": null on every chunk but the last when usage was asked for
            chunk["usage"] = None
        return chunk



class ChatFormat(OpenAIFormat):
    """`/v1/chat/completions`: `chat.completion` bodies and `chat.completion.chunk` stream chunks."""

    chunk_object = "chat.completion.chunk"

    def __init__(
        self, body: ChatCompletionRequest, request_id: str, tokenizer: Tokenizer, forced: str = "", index: int = 0
    ) -> None:
        include = bool(body.stream_options and body.stream_options.include_usage)
        super().__init__(body.stream, include, request_id, body.model, tokenizer, index)
        self.parser = CompletionStreamParser(body.thinking_mode())
        self.tool_calls = 0
        # A forced tool-call start is in the prompt, not the output: the parser reads it as the output's start.
        self._forced_events = self.parser.feed(forced) if forced else []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._stream_chunk(self.chunk_object, choice)

    def _logprobs(self, logprobs: Logprobs) -> dict[str, Any]:
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
        return chunks

    def full(self, text: str, done: Done, logprobs: Logprobs) -> dict[str, Any]:
        self.parser.feed(text)
        self.parser.finish()
        message = self.parser.result.to_openai_message()
        self.tool_calls = len(self.parser.result.tool_calls)
        choice = {
            "index": self.index,
            "message": message,
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": self._reason(done),
        }
        return {**self._envelope("chat.completion", [choice]), "usage": self.usage_body(done.usage)}


class TextFormat(OpenAIFormat):
    """`/v1/completions`: `text_completion` bodies and stream chunks, with `text_offset` in the logprobs. `echo`:
    the prompt's text, which the choice's text starts with (its stream's first chunk), when the body asks."""

    skip_special_tokens = True
    chunk_object = "text_completion"

    def __init__(
        self, body: CompletionRequest, request_id: str, tokenizer: Tokenizer, index: int = 0, echo: str = ""
    ) -> None:
        include = bool(body.stream_options and body.stream_options.include_usage)
        super().__init__(body.stream, include, request_id, body.model, tokenizer, index)
        self.echo = echo
        self.offset = len(echo)  # text_offset of the next token

    def _choice(self, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def start(self) -> list[dict[str, Any]]:
        return [self._stream_chunk(self.chunk_object, self._choice(self.echo, None, None))] if self.echo else []

    def _logprobs(self, logprobs: Logprobs) -> dict[str, Any]:
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
        lps = self._logprobs(logprobs) if logprobs else None
        return [self._stream_chunk(self.chunk_object, self._choice(text, None, lps))]

    def end(self, done: Done) -> list[dict[str, Any]]:
        return [self._stream_chunk(self.chunk_object, self._choice("", done.reason, None))]

    def full(self, text: str, done: Done, logprobs: Logprobs) -> dict[str, Any]:
        lps = self._logprobs(logprobs) if logprobs else None
        choice = self._choice(self.echo + text, done.reason, lps)
        return {**self._envelope("text_completion", [choice]), "usage": self.usage_body(done.usage)}
