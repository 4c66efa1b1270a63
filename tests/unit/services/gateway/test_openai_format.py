"""OpenAI response shapes: every body and chunk validates as the official `openai` client's types, and carries the
text, reasoning, tool calls, logprobs and usage it was fed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dsv4.model_runtime.dsml import forced_tool_call_prefix
from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services.gateway.openai_format import ChatFormat, TextFormat, model_card, sse_event
from dsv4.services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from dsv4.services.gateway.streaming import Done
from dsv4.services.token_stream import Usage

pytestmark = pytest.mark.unit

MODEL = "deepseek-v4-flash"
TOOL_CALL = (
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained()


def chat_body(**extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
    )


def lps(tok: Tokenizer, text: str) -> list[tuple[int, TokenLogprobs]]:
    return [(t, TokenLogprobs(-0.5 * i, ((t, -0.5 * i), (t + 1, -9.0)))) for i, t in enumerate(tok.encode(text))]


def test_chat_stream_chunks_carry_role_text_logprobs_finish_and_usage(tok: Tokenizer) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=1)
    fmt = ChatFormat(body, "chatcmpl-1", tok)
    first, second = lps(tok, "Hello"), lps(tok, " world")
    raw = [*fmt.start(), *fmt.delta("Hello", first), *fmt.delta(" world", second)]
    usage = Usage(3, len(first) + len(second))
    raw += fmt.end(Done("length", usage)) + fmt.usage_chunks(usage)
    chunks = [ChatCompletionChunk.model_validate(c) for c in raw]
    assert all(c.id == "chatcmpl-1" and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [tok.token_bytes(t).decode() for t, _ in first + second]
    assert [len(e.top_logprobs) for e in streamed] == [2] * len(streamed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3 + len(first) + len(second)


def test_chat_stream_without_usage_has_no_usage_key(tok: Tokenizer) -> None:
    fmt = ChatFormat(chat_body(stream=True), "c", tok)
    raw = [*fmt.start(), *fmt.delta("x", []), *fmt.end(Done("stop", Usage(1, 1))), *fmt.usage_chunks(Usage(1, 1))]
    assert all("usage" not in c for c in raw) and raw[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_whole_body_parses_reasoning_content_and_tool_calls(tok: Tokenizer) -> None:
    fmt = ChatFormat(chat_body(thinking={"type": "enabled"}), "chatcmpl-2", tok)
    text = "Need the weather.</think>Let me check." + TOOL_CALL
    resp = ChatCompletion.model_validate(fmt.full(text, Done("stop", Usage(5, 20)), []))
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and resp.choices[0].logprobs is None
    assert msg.content == "Let me check."
    assert msg.model_extra is not None and msg.model_extra["reasoning_content"] == "Need the weather."
    assert msg.tool_calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris"})
    ]
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 20)


def test_a_forced_tool_call_start_is_streamed_as_the_output_start(tok: Tokenizer) -> None:
    forced = forced_tool_call_prefix("get_weather")
    fmt = ChatFormat(chat_body(stream=True), "c", tok, forced)
    rest = TOOL_CALL.removeprefix(forced)
    raw = [*fmt.start(), *fmt.delta(rest, []), *fmt.end(Done("stop", Usage(1, 9)))]
    chunks = [ChatCompletionChunk.model_validate(c) for c in raw]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [tc.function.name for tc in calls if tc.function and tc.function.name] == ["get_weather"]
    assert "".join(tc.function.arguments or "" for tc in calls if tc.function) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""


def test_text_completion_logprobs_report_offsets_across_deltas(tok: Tokenizer) -> None:
    body = CompletionRequest.model_validate({"model": MODEL, "prompt": "Hi", "stream": True, "logprobs": 1})
    fmt = TextFormat(body, "cmpl-1", tok)
    a, b = lps(tok, "Hello"), lps(tok, " there friend")
    raw = [*fmt.delta("Hello", a), *fmt.delta("", []), *fmt.delta(" there friend", b)]
    raw += fmt.end(Done("stop", Usage(2, len(a) + len(b))))
    # Streamed chunks carry finish_reason null, which the client's (non-streaming) `Completion` type refuses.
    assert Completion.model_validate(raw[-1]).choices[0].finish_reason == "stop"
    choices = [c["choices"][0] for c in raw]
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert "".join(tokens) == "Hello there friend" == "".join(c["text"] for c in choices)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert len(raw) == 3 and all(c["object"] == "text_completion" for c in raw)  # the empty delta sends nothing

    whole = TextFormat(CompletionRequest.model_validate({"model": MODEL, "prompt": "Hi"}), "cmpl-2", tok)
    resp = Completion.model_validate(whole.full("Hello", Done("length", Usage(2, 1)), []))
    assert resp.choices[0].text == "Hello" and resp.choices[0].logprobs is None and resp.usage is not None


def test_sse_event_and_model_card() -> None:
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "dsv4", "max_model_len": 4096}
    assert model_card(MODEL, 4096) == card


def test_formats_of_several_choices_carry_their_index_and_echo(tok: Tokenizer) -> None:
    """Each choice's chunks and body name its index; an echoed prompt opens a text choice's stream and starts its
    whole text."""
    body = CompletionRequest.model_validate(
        {"model": MODEL, "prompt": ["a", "b"], "n": 2, "stream": True, "echo": True}
    )
    fmt = TextFormat(body, "cmpl-1", tok, 3, "b")
    raw = [*fmt.start(), *fmt.delta("x", []), *fmt.end(Done("stop", Usage(1, 1)))]
    assert [c["choices"][0]["index"] for c in raw] == [3, 3, 3]
    assert "".join(c["choices"][0]["text"] for c in raw) == "bx"
    assert fmt.full("x", Done("stop", Usage(1, 1)), [])["choices"][0] == {
        "index": 3, "text": "bx", "logprobs": None, "finish_reason": "stop"
    }
    chat = ChatFormat(chat_body(stream=True), "c", tok, "", 2)
    assert {c["choices"][0]["index"] for c in [*chat.start(), *chat.delta("y", [])]} == {2}
