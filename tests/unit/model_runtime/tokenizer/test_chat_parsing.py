"""Parsing model output: DSML round trips, streaming equals one-shot, strict and lenient behaviour."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dsv4.model_runtime.chat_encoding import render_prompt
from dsv4.model_runtime.chat_parsing import CompletionStreamParser, DeltaEvent, ParsedCompletion, parse_completion
from dsv4.model_runtime.chat_tokens import DSML, EOS, RESERVED_IN_OUTPUT
from dsv4.model_runtime.dsml import TOOL_CALLS_START, forced_tool_call_prefix, render_tool_calls

pytestmark = pytest.mark.unit


def _ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


# Text built from marker fragments, so partial markers (`</thi`, `\n\n<｜`) show up at delta boundaries.
FRAGMENTS = [
    "a",
    "Z",
    " ",
    "\n",
    "\t",
    "<",
    ">",
    "/",
    "think",
    "｜",
    "DSML",
    "tool_calls",
    "end",
    "中文",
    "🤖",
    '"',
    "=",
]
free_text = (
    st.lists(st.sampled_from(FRAGMENTS), max_size=16)
    .map("".join)
    .filter(lambda t: not any(m in t for m in (*RESERVED_IN_OUTPUT, TOOL_CALLS_START)))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
tool_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
arguments = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: '"' not in k), json_values, max_size=4)
tool_calls = st.lists(st.tuples(tool_names, arguments), max_size=3)


def _stream(text: str, cuts: list[int], mode: Any) -> tuple[list[DeltaEvent], ParsedCompletion]:
    parser = CompletionStreamParser(mode, id_factory=_ids())
    events: list[DeltaEvent] = []
    points = sorted({min(c, len(text)) for c in cuts})
    for start, end in zip([0, *points], [*points, len(text)], strict=True):
        events += parser.feed(text[start:end])
    events += parser.finish()
    return events, parser.result


def _collect(events: list[DeltaEvent]) -> ParsedCompletion:
    out = ParsedCompletion()
    for event in events:
        if event.kind == "reasoning":
            out.reasoning_content += event.text
        elif event.kind == "content":
            out.content += event.text
        else:
            assert event.tool_call is not None and event.index == len(out.tool_calls)
            out.tool_calls.append(event.tool_call)
    return out


@settings(max_examples=80, deadline=None)
@given(content=free_text, calls=tool_calls)
def test_dsml_render_then_parse_round_trips(content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    assume(all(DSML not in json.dumps(args, ensure_ascii=False) for _, args in calls))
    block = render_tool_calls([_call(name, args) for name, args in calls]) if calls else ""
    parsed = parse_completion(content + block + EOS, "chat", strict=True, id_factory=_ids())
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        (name, json.dumps(args, ensure_ascii=False)) for name, args in calls
    ]
    assert [json.loads(c.arguments) for c in parsed.tool_calls] == [args for _, args in calls]


@settings(max_examples=60, deadline=None)
@given(reasoning=free_text, content=free_text, calls=tool_calls, cuts=st.lists(st.integers(0, 400), max_size=12))
def test_assistant_turn_rendered_in_the_prompt_parses_back_streaming_or_not(
    reasoning: str, content: str, calls: list[tuple[str, dict[str, Any]]], cuts: list[int]
) -> None:
    assume(all(DSML not in json.dumps(args, ensure_ascii=False) for _, args in calls))
    user = {"role": "user", "content": "question"}
    assistant: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        assistant["tool_calls"] = [_call(name, args) for name, args in calls]
    prefix = render_prompt([user], thinking_mode="thinking")
    prompt = render_prompt([user, assistant], thinking_mode="thinking")
    assert prompt.startswith(prefix)
    completion = prompt[len(prefix) :]

    parsed = parse_completion(completion, "thinking", strict=True, id_factory=_ids())
    assert (parsed.reasoning_content, parsed.content) == (reasoning, content)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls

    events, result = _stream(completion, cuts, "thinking")
    assert _collect(events) == result == parsed
    kinds = [e.kind for e in events]
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool_call"].index)


def test_partial_markers_are_held_back_until_resolved() -> None:
    parser = CompletionStreamParser("thinking")
    assert parser.feed("plan</thi") == [DeltaEvent("reasoning", "plan")]
    assert parser.feed("nk>Hi\n") == [DeltaEvent("content", "Hi")]
    assert parser.feed("\n<｜DS") == []
    assert parser.feed("ML｜tool_calls>\n") == []
    events = parser.feed(
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n'
    )
    assert events == []
    [event] = parser.feed("</｜DSML｜invoke>\n")
    assert event.kind == "tool_call" and event.tool_call is not None
    assert (event.tool_call.name, event.tool_call.arguments) == ("f", '{"x": 1}')
    assert parser.feed("</｜DSML｜tool_calls>" + EOS) == []
    assert parser.finish() == []
    # A held-back tail that turns out not to be a marker is released as text.
    chat = CompletionStreamParser("chat")
    assert chat.feed("x\n") == [DeltaEvent("content", "x")]
    assert chat.feed("y<｜end") == [DeltaEvent("content", "\ny")]
    assert chat.finish() == [DeltaEvent("content", "<｜end")]


def test_openai_shapes() -> None:
    text = 'r</think>c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    parser = CompletionStreamParser("thinking", id_factory=_ids())
    events = parser.feed(text + EOS) + parser.finish()
    assert [e.to_openai_delta() for e in events] == [
        {"reasoning_content": "r"},
        {"content": "c"},
        {
            "tool_calls": [
                {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]
        },
    ]
    assert parser.result.to_openai_message() == {
        "role": "assistant",
        "content": "c",
        "reasoning_content": "r",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert parse_completion("hello" + EOS).to_openai_message() == {"role": "assistant", "content": "hello"}


def test_non_string_parameters_are_inserted_verbatim() -> None:
    block = (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="n" string="false">3.5</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="s" string="true">say "hi"\nnow</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k": [1, null]}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
    [call] = parse_completion(block + EOS, strict=True).tool_calls
    assert json.loads(call.arguments) == {"n": 3.5, "s": 'say "hi"\nnow', "o": {"k": [1, None]}}


_OPEN = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
_CLOSE = "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
MALFORMED_BLOCKS = [
    "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=f>\n" + _CLOSE,
    '\n\n<｜DSML｜tool_calls> <｜DSML｜invoke name="f">\n' + _CLOSE,
    _OPEN + '<｜DSML｜parameter name="a" string="maybe">1</｜DSML｜parameter>\n' + _CLOSE,
    _OPEN
    + '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
    + '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n'
    + _CLOSE,
]


@pytest.mark.parametrize("block", MALFORMED_BLOCKS)
def test_malformed_dsml_is_an_error_in_strict_mode_and_content_otherwise(block: str) -> None:
    with pytest.raises(ValueError, match=r"format error|duplicate parameter"):
        parse_completion("ok" + block + EOS, strict=True)
    lenient = parse_completion("ok" + block + EOS)
    assert lenient.tool_calls == []
    assert lenient.content == "ok" + block  # nothing the model wrote is lost


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("no end of thinking" + EOS, "thinking", "missing </think>"),
        ("reasoning only", "thinking", "missing </think>"),
        ("no eos", "chat", "missing EOS"),
        ("a</think>b" + EOS, "chat", "unexpected special token"),
        ("a" + EOS + "b", "chat", "after EOS"),
        ("x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>junk" + EOS, "chat", "after tool calls"),
        ('x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n', "chat", "not closed"),
    ],
)
def test_strict_mode_rejects_what_the_official_parser_rejects(text: str, mode: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_completion(text, mode, strict=True)


def test_lenient_mode_accepts_cut_off_output() -> None:
    assert parse_completion("no eos") == ParsedCompletion(content="no eos")
    assert parse_completion("thinking cut", "thinking") == ParsedCompletion(reasoning_content="thinking cut")
    # Cut in the middle of the second invoke: the first call survives, the unparsed rest is returned as text
    # (the official grammar ends an invoke at `</｜DSML｜invoke`; its `>` belongs to what follows).
    first = (
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n</｜DSML｜invoke'
    )
    rest = '>\n<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="b" string="tr'
    cut = parse_completion("r</think>" + "\n\n<｜DSML｜tool_calls>\n" + first + rest, "thinking", id_factory=_ids())
    assert cut.reasoning_content == "r"
    assert [(c.name, c.arguments) for c in cut.tool_calls] == [("f", '{"a": "1"}')]
    assert cut.content == rest
    # A model that skips </think> and goes straight to a tool call still gets its call through.
    direct = parse_completion("plan" + render_tool_calls([_call("f", {})]) + EOS, "thinking")
    assert direct.reasoning_content == "plan" and [c.name for c in direct.tool_calls] == ["f"]


def test_parser_lifecycle_errors() -> None:
    parser = CompletionStreamParser()
    unknown_mode: Any = "deep"
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(ValueError, match="thinking_mode"):
        CompletionStreamParser(unknown_mode)


@pytest.mark.parametrize("function", [None, "get_weather"])
def test_a_forced_tool_call_start_plus_the_rest_parses_as_the_rendered_call(function: str | None) -> None:
    """What the gateway appends to the prompt is the start of what `render_tool_calls` writes; fed to the parser
    before the model's continuation, the whole parses back to the call."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    block = render_tool_calls([call])
    prefix = forced_tool_call_prefix(function)
    assert block.startswith(prefix) and prefix.startswith(TOOL_CALLS_START)
    parser = CompletionStreamParser("chat")
    assert parser.feed(prefix) == []
    parser.feed(block[len(prefix) :] + EOS)
    parser.finish()
    [parsed] = parser.result.tool_calls
    assert (parsed.name, json.loads(parsed.arguments)) == ("get_weather", {"city": "Paris"})
    assert parser.result.content == ""
