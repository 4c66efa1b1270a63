"""Model output back to an OpenAI assistant message: reasoning, content and DSML tool calls.

One incremental state machine serves both uses: `CompletionStreamParser` takes text deltas and yields
OpenAI-style delta events, holding back any tail that might be the start of a marker (`</think>`, the EOS text,
the blank line before a tool-call block), and `parse_completion` feeds it the whole text at once. So the
concatenated deltas always equal the one-shot result.

The grammar is the official `parse_message_from_completion_text`: in thinking mode the text up to `</think>` is
reasoning (the prompt already opened `<think>`); then content up to the EOS text or `\\n\\n<｜DSML｜tool_calls`;
then the tool-call block and EOS. `strict=True` rejects what the official parser rejects (ValueError).
The default is lenient, for serving: a missing EOS or `</think>` (output cut by max_tokens, or special tokens
skipped by the detokenizer) is accepted, and text that is not valid DSML is returned as content, never lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from dsv4.model_runtime.chat_tokens import EOS, RESERVED_IN_OUTPUT, THINK_END
from dsv4.model_runtime.dsml import TOOL_CALLS_START, DsmlError, ToolCallBlockParser, find_stop, held_back

ThinkingMode = Literal["chat", "thinking"]


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tool_calls[]` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class DeltaEvent:
    """One piece of streamed output: reasoning text, content text, or a complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    tool_call: ToolCall | None = None
    index: int = 0  # position of the tool call in the message (OpenAI `tool_calls[].index`)

    def to_openai_delta(self) -> dict[str, Any]:
        """The `choices[].delta` object of a chat.completion.chunk."""
        if self.kind == "reasoning":
            return {"reasoning_content": self.text}
        if self.kind == "content":
            return {"content": self.text}
        assert self.tool_call is not None
        return {"tool_calls": [{"index": self.index, **self.tool_call.to_openai()}]}


@dataclass
class ParsedCompletion:
    """An assistant message parsed from model output."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_openai_message(self) -> dict[str, Any]:
        """The OpenAI assistant message (`reasoning_content` only when there is reasoning)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


class _State(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_CALLS = "tool_calls"
    AFTER_TOOL_CALLS = "after_tool_calls"  # only the EOS text may follow the block
    RAW = "raw"  # lenient fallback: everything up to EOS is content
    END = "end"  # after the EOS text


class CompletionStreamParser:
    """Feed model output deltas; get OpenAI-style delta events that never contain a partial marker.

    `thinking_mode` must be the mode the prompt was rendered in. Call `finish()` once at the end of the stream;
    `result` holds the accumulated message.
    """

    def __init__(
        self,
        thinking_mode: ThinkingMode = "chat",
        *,
        strict: bool = False,
        id_factory: Callable[[], str] = new_tool_call_id,
    ) -> None:
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self._strict = strict
        self._new_id = id_factory
        self._text = ""
        self._pos = 0
        self._state = _State.REASONING if thinking_mode == "thinking" else _State.CONTENT
        self._block: ToolCallBlockParser | None = None
        self._block_start = 0  # where the not-yet-parsed part of the tool-call block starts in self._text
        self._finished = False
        self.result = ParsedCompletion()

    def feed(self, delta: str) -> list[DeltaEvent]:
        """Add generated text; returns the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._text += delta
        return self._run(final=False)

    def finish(self) -> list[DeltaEvent]:
        """End of output: flushes held-back text; in strict mode raises ValueError on malformed output."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        events = self._run(final=True)
        self._finished = True
        if self._strict:
            if self._state is _State.REASONING:
                raise ValueError("invalid thinking format: missing </think>")
            if self._state is _State.CONTENT:
                raise ValueError("invalid format: missing EOS")
            for token in RESERVED_IN_OUTPUT:
                if token in self.result.content or token in self.result.reasoning_content:
                    raise ValueError(f"unexpected special token {token!r} in parsed output")
        return events

    def _run(self, final: bool) -> list[DeltaEvent]:
        events: list[DeltaEvent] = []
        while True:
            before = (self._state, self._pos, len(events))
            if self._state is _State.REASONING:
                self._scan_text("reasoning", [THINK_END, TOOL_CALLS_START, EOS], final, events)
            elif self._state in (_State.CONTENT, _State.RAW):
                stops = [EOS, TOOL_CALLS_START] if self._state is _State.CONTENT else [EOS]
                self._scan_text("content", stops, final, events)
            elif self._state is _State.TOOL_CALLS:
                self._scan_tool_calls(final, events)
            elif self._state is _State.AFTER_TOOL_CALLS:
                self._scan_after_tool_calls(final, events)
            else:
                self._scan_after_end(events)
            if (self._state, self._pos, len(events)) == before:
                self._compact()
                return events

    def _compact(self) -> None:
        # Drop consumed text so a long stream costs linear time; a pending tool-call block keeps its start
        # for the lenient fallback.
        if self._state is not _State.TOOL_CALLS and self._pos:
            self._text = self._text[self._pos :]
            self._pos = 0

    def _emit(self, kind: Literal["reasoning", "content"], text: str, events: list[DeltaEvent]) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.result.reasoning_content += text
        else:
            self.result.content += text
        if events and events[-1].kind == kind:
            events[-1] = DeltaEvent(kind, events[-1].text + text)
        else:
            events.append(DeltaEvent(kind, text))

    def _scan_text(
        self, kind: Literal["reasoning", "content"], stops: list[str], final: bool, events: list[DeltaEvent]
    ) -> None:
        found = find_stop(self._text, self._pos, stops, final)
        if found is None:
            end = len(self._text) if final else len(self._text) - held_back(self._text, self._pos, stops)
            self._emit(kind, self._text[self._pos : end], events)
            self._pos = end
            return
        pos, stop = found
        self._emit(kind, self._text[self._pos : pos], events)
        self._pos = pos + len(stop)
        if stop == THINK_END:
            self._state = _State.CONTENT
        elif stop == EOS:
            if kind == "reasoning" and self._strict:
                raise ValueError("invalid thinking format: missing </think>")
            self._state = _State.END
        else:  # the tool-call block starts
            if kind == "reasoning" and self._strict:
                raise ValueError("invalid thinking format: missing </think>")
            self._state = _State.TOOL_CALLS
            self._block = ToolCallBlockParser()
            self._block_start = pos

    def _scan_tool_calls(self, final: bool, events: list[DeltaEvent]) -> None:
        assert self._block is not None
        block = self._block
        fed = len(block.text)
        start = self._pos
        try:
            invokes = block.feed(self._text[start + fed :], final=final)
        except DsmlError as exc:
            if self._strict:
                raise ValueError(str(exc)) from exc
            # Lenient: the unparsed rest of the block becomes content, so nothing the model wrote is lost.
            self._state = _State.RAW
            self._pos = self._block_start
            return
        for invoke in invokes:
            call = ToolCall(id=self._new_id(), name=invoke.name, arguments=invoke.arguments)
            events.append(DeltaEvent("tool_call", tool_call=call, index=len(self.result.tool_calls)))
            self.result.tool_calls.append(call)
        if invokes:
            self._block_start = start + block.last_invoke_end
        if block.done:
            self._pos = start + block.consumed
            self._block = None
            self._state = _State.AFTER_TOOL_CALLS

    def _scan_after_tool_calls(self, final: bool, events: list[DeltaEvent]) -> None:
        found = find_stop(self._text, self._pos, [EOS], final)
        if found is None and not final:
            return
        end = found[0] if found is not None else len(self._text)
        trailing = self._text[self._pos : end]
        if trailing:
            if self._strict:
                raise ValueError(f"unexpected content after tool calls: {trailing!r}")
            self._emit("content", trailing, events)
        self._pos = end + (len(EOS) if found is not None else 0)
        self._state = _State.END if found is not None else _State.AFTER_TOOL_CALLS

    def _scan_after_end(self, events: list[DeltaEvent]) -> None:
        rest = self._text[self._pos :]
        if rest:
            if self._strict:
                raise ValueError(f"unexpected content after EOS: {rest!r}")
            self._emit("content", rest, events)
            self._pos = len(self._text)


def parse_completion(
    text: str,
    thinking_mode: ThinkingMode = "chat",
    *,
    strict: bool = False,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> ParsedCompletion:
    """Parse complete model output (the text generated after the prompt) into an assistant message."""
    parser = CompletionStreamParser(thinking_mode, strict=strict, id_factory=id_factory)
    parser.feed(text)
    parser.finish()
    return parser.result
