"""DSML, the markup DeepSeek-V4 writes tool calls in: rendering OpenAI tool calls, and parsing them back.

A block looks like this (`｜DSML｜` is one token; the block follows the content after a blank line):

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

String arguments are written as is (`string="true"`), every other JSON value as JSON (`string="false"`).
The parser accepts exactly the grammar of the official `encoding_dsv4.parse_tool_calls` and can be fed text
incrementally, so streaming and one-shot parsing share one implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dsv4.model_runtime.chat_tokens import DSML

TOOL_CALLS_BLOCK = "tool_calls"
# What separates content from a tool-call block; the parser stops content here (no ">" on purpose: the
# official parser checks the rest of the opening tag itself).
TOOL_CALLS_START = f"\n\n<{DSML}{TOOL_CALLS_BLOCK}"
_INVOKE_OPEN = f"<{DSML}invoke"
_INVOKE_CLOSE = f"</{DSML}invoke"
_PARAM_OPEN = f"<{DSML}parameter"
_PARAM_CLOSE = f"/{DSML}parameter"
_BLOCK_CLOSE = f"</{DSML}{TOOL_CALLS_BLOCK}>"

# `\n?` at the end reproduces the official regexes, whose `$` also matches before one final newline (that is
# what lets an invoke without parameters parse).
_NAME_RE = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
_PARAM_RE = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)


def to_json(value: Any) -> str:
    """JSON as the official encoder writes it into prompts and tool arguments: non-ASCII as is, default spacing."""
    return json.dumps(value, ensure_ascii=False)


def tool_call_arguments(tool_call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and decoded arguments of one OpenAI-style tool call; ValueError names what is wrong."""
    if not isinstance(tool_call, Mapping):
        raise ValueError(f"a tool call must be an object, got {type(tool_call).__name__}")
    function = tool_call.get("function")
    if not isinstance(function, Mapping):
        raise ValueError(f"tool call {tool_call.get('id', '')!r} has no 'function' object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call {tool_call.get('id', '')!r} has no function name")
    raw = function.get("arguments", "{}")
    if isinstance(raw, Mapping):
        arguments: Any = dict(raw)
    elif isinstance(raw, str):
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments of tool call {name!r} are not valid JSON: {exc}") from exc
    else:
        raise ValueError(f"arguments of tool call {name!r} must be a JSON string, got {type(raw).__name__}")
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments of tool call {name!r} must be a JSON object, got {type(arguments).__name__}")
    return name, arguments


# The blank line and opening tag that start a tool-call block in a message, and the opening of one invoke.
_BLOCK_START = f"\n\n<{DSML}{TOOL_CALLS_BLOCK}>\n"


def _invoke_start(name: str) -> str:
    return f'<{DSML}invoke name="{name}">\n'


def render_invoke(name: str, arguments: Mapping[str, Any]) -> str:
    """One `<｜DSML｜invoke>` element."""
    params = "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else to_json(value)}</{DSML}parameter>"
        for key, value in arguments.items()
    )
    return f"{_invoke_start(name)}{params}\n</{DSML}invoke>"


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """The DSML block for OpenAI-style `tool_calls`, with the blank line that precedes it in a message."""
    invokes = "\n".join(render_invoke(*tool_call_arguments(tc)) for tc in tool_calls)
    return f"{_BLOCK_START}{invokes}\n</{DSML}{TOOL_CALLS_BLOCK}>"


def forced_tool_call_prefix(function: str | None) -> str:
    """The start of an assistant turn that can only continue as tool calls (`tool_choice` "required"), or as a
    call of `function` first (a named `tool_choice`): appended to the prompt, it makes the model write the rest of
    the block. The text `render_tool_calls` writes, cut after the opening tag (and the named invoke's)."""
    return _BLOCK_START + (_invoke_start(function) if function is not None else "")


def arguments_json(params: Sequence[tuple[str, str, bool]]) -> str:
    """The `arguments` JSON string for parsed (name, value text, is_string) parameters, spelled as the official
    decoder spells it (non-string values are inserted verbatim, so a malformed one stays visible)."""
    parts = (f"{to_json(key)}: {to_json(value) if is_string else value}" for key, value, is_string in params)
    return "{" + ", ".join(parts) + "}"


class DsmlError(ValueError):
    """The text is not a well-formed DSML tool-call block."""


def find_stop(text: str, start: int, stops: Sequence[str], final: bool) -> tuple[int, str] | None:
    """Earliest occurrence at or after `start` of any stop string, as (position, stop).

    When not `final` the text may still grow, so a match counts only if no other stop could still complete at
    an earlier position; None means "wait for more text". First-listed stop wins a tie, as in the official
    reader.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if final or best is None:
        return best
    first_partial = len(text) - held_back(text, start, stops)
    return best if best[0] <= first_partial else None


def held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text[start:]` that is a proper prefix of some stop string: text that
    must not be emitted yet because the next delta may complete a marker."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class _Step(Enum):
    BLOCK = "block"  # before an invoke or the block's closing tag
    NAME = "name"  # inside an invoke's opening tag
    PARAM = "param"  # inside a parameter
    AFTER_PARAM = "after_param"  # between a parameter and the next one or the invoke's end
    DONE = "done"


@dataclass(frozen=True)
class ParsedInvoke:
    """One parsed tool call: its function name and arguments as a JSON string."""

    name: str
    arguments: str


class ToolCallBlockParser:
    """Incremental parser of the text that follows `TOOL_CALLS_START`.

    `feed` returns the invokes that became complete; `done` turns True once the closing tag is read. A format
    error raises `DsmlError` at the point the official parser would reject the text.
    """

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0
        self._step = _Step.BLOCK
        self._name = ""
        self._params: list[tuple[str, str, bool]] = []
        self.last_invoke_end = 0  # where the text after the latest completed invoke starts
        self._scan_from = 0

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    @property
    def consumed(self) -> int:
        """Characters of the fed text read so far (the block's length once `done`)."""
        return self._pos

    @property
    def text(self) -> str:
        return self._text

    def feed(self, delta: str, final: bool = False) -> list[ParsedInvoke]:
        """Add text; returns the invokes completed by it. With `final`, the text is complete and an unfinished
        block is an error."""
        self._text += delta
        completed: list[ParsedInvoke] = []
        while self._step is not _Step.DONE:
            invoke = self._advance(final)
            if invoke is False:
                break
            if isinstance(invoke, ParsedInvoke):
                completed.append(invoke)
        if final and self._step is not _Step.DONE:
            raise DsmlError(f"tool-call block is not closed with {_BLOCK_CLOSE!r}")
        return completed

    def _read(self, stops: Sequence[str], final: bool) -> tuple[str, str] | None:
        # A retry of the same read resumes where the previous scan could not have missed a stop, so a long
        # parameter value streamed in small deltas is scanned once, not once per delta.
        found = find_stop(self._text, max(self._pos, self._scan_from), stops, final)
        if found is None:
            if final:
                raise DsmlError(f"tool-call block is not closed: expected one of {list(stops)!r}")
            self._scan_from = max(self._pos, len(self._text) - max(map(len, stops)) + 1)
            return None
        pos, stop = found
        gap = self._text[self._pos : pos]
        self._pos = pos + len(stop)
        self._scan_from = 0
        return gap, stop

    def _advance(self, final: bool) -> ParsedInvoke | bool:
        """One step of the grammar: False when more text is needed, an invoke when one closed, else True."""
        if self._step is _Step.BLOCK:
            read = self._read([_INVOKE_OPEN, _BLOCK_CLOSE], final)
            if read is None:
                return False
            gap, stop = read
            if gap != ">\n":
                raise DsmlError(f"tool-call format error: expected '>\\n' but got {gap!r}")
            self._step = _Step.DONE if stop == _BLOCK_CLOSE else _Step.NAME
            return True
        if self._step is _Step.NAME:
            read = self._read([_PARAM_OPEN, _INVOKE_CLOSE], final)
            if read is None:
                return False
            gap, stop = read
            match = _NAME_RE.fullmatch(gap)
            if match is None:
                raise DsmlError(f"tool name format error: {gap!r}")
            self._name, self._params = match.group(1), []
            return self._after_element(stop)
        if self._step is _Step.PARAM:
            read = self._read([_PARAM_CLOSE], final)
            if read is None:
                return False
            gap, _ = read
            match = _PARAM_RE.fullmatch(gap)
            if match is None:
                raise DsmlError(f"parameter format error: {gap!r}")
            key, is_string, value = match.groups()
            if any(key == seen for seen, _, _ in self._params):
                raise DsmlError(f"duplicate parameter name {key!r} in tool call {self._name!r}")
            self._params.append((key, value, is_string == "true"))
            self._step = _Step.AFTER_PARAM
            return True
        read = self._read([_PARAM_OPEN, _INVOKE_CLOSE], final)
        if read is None:
            return False
        gap, stop = read
        if gap != ">\n":
            raise DsmlError(f"parameter format error: expected '>\\n' but got {gap!r}")
        return self._after_element(stop)

    def _after_element(self, stop: str) -> ParsedInvoke | bool:
        if stop == _PARAM_OPEN:
            self._step = _Step.PARAM
            return True
        self._step = _Step.BLOCK
        self.last_invoke_end = self._pos
        return ParsedInvoke(self._name, arguments_json(self._params))
