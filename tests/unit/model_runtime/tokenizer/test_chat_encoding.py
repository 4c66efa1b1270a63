"""The chat encoder against the official DeepSeek-V4 encoding rules.

The four `data/official` vectors are the test cases of DeepSeek's `encoding/test_encoding_dsv4.py` (MIT,
Copyright DeepSeek), shipped with the DeepSeek-V4-Flash checkpoint; they were read from vLLM's verbatim copy
(`tests/tokenizers_/fixtures/deepseek_v4`, whose inputs rename `reasoning_content` to `reasoning`; restored
here) and case 2's gold text from its published copy. The other cases check one rule of `encoding_dsv4.py`
each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dsv4.model_runtime.chat_encoding import REASONING_EFFORT_MAX_PREFIX, ChatEncoder, render_prompt, render_tools
from dsv4.model_runtime.chat_parsing import parse_completion
from dsv4.model_runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "official"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SYSTEM = {"role": "system", "content": "You are helpful."}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _official_case(number: int) -> tuple[list[dict[str, Any]], str]:
    data = json.loads((DATA / f"test_input_{number}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1 keeps the tools beside the messages; the official test attaches them
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (DATA / f"test_output_{number}.txt").read_text(encoding="utf-8")


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.mark.parametrize(("number", "mode"), [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_vectors(number: int, mode: Any) -> None:
    messages, gold = _official_case(number)
    before = copy.deepcopy(messages)
    assert render_prompt(messages, thinking_mode=mode) == gold
    assert messages == before  # the caller's messages are not modified


def test_official_case_1_parses_back() -> None:
    messages, _ = _official_case(1)
    prompt = render_prompt(messages, thinking_mode="thinking")
    marker = ASSISTANT + "<think>"
    start = prompt.find(marker) + len(marker)
    first = parse_completion(prompt[start : prompt.find(USER, start)], "thinking", strict=True)
    assert (
        first.reasoning_content == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    )
    assert first.content == ""
    assert [c.name for c in first.tool_calls] == ["get_weather"]
    assert json.loads(first.tool_calls[0].arguments) == {"location": "Beijing", "unit": "celsius"}
    last = parse_completion(prompt[prompt.rfind(marker) + len(marker) :], "thinking", strict=True)
    assert last.reasoning_content == "Got the weather data. Let me format a nice response."
    assert "22°C" in last.content
    assert last.tool_calls == []


def test_official_case_2_drops_earlier_reasoning_and_parses_back() -> None:
    messages, _ = _official_case(2)
    prompt = render_prompt(messages, thinking_mode="thinking")
    assert "The user said hello" not in prompt
    marker = ASSISTANT + "<think>"
    parsed = parse_completion(prompt[prompt.rfind(marker) + len(marker) :], "thinking", strict=True)
    assert parsed.reasoning_content == "The user asks about the capital of France. It is Paris."
    assert parsed.content == "The capital of France is Paris."
    assert parsed.tool_calls == []


def test_generation_prompt_closes_or_opens_thinking() -> None:
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    assert render_prompt(messages) == BOS + "You are helpful." + USER + "hi" + ASSISTANT + "</think>"
    assert render_prompt(messages, thinking_mode="thinking").endswith(USER + "hi" + ASSISTANT + "<think>")


def test_chat_mode_history_has_no_reasoning() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "secret"},
        {"role": "user", "content": "c"},
    ]
    expected = BOS + USER + "a" + ASSISTANT + "</think>b" + EOS + USER + "c" + ASSISTANT + "</think>"
    assert render_prompt(messages) == expected


def test_reasoning_effort_max_prefixes_thinking_prompts_only() -> None:
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    plain = render_prompt(messages, thinking_mode="thinking")
    assert render_prompt(messages, thinking_mode="thinking", reasoning_effort="max") == (
        BOS + REASONING_EFFORT_MAX_PREFIX + plain[len(BOS) :]
    )
    assert REASONING_EFFORT_MAX_PREFIX.startswith("Reasoning Effort: Absolute maximum")
    assert render_prompt(messages, thinking_mode="thinking", reasoning_effort="high") == plain
    assert render_prompt(messages, reasoning_effort="max") == render_prompt(messages)


def test_thinking_multi_turn_keeps_only_the_current_turns_reasoning() -> None:
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    dropped = render_prompt(messages, thinking_mode="thinking")
    assert dropped == (
        BOS + USER + "q1" + ASSISTANT + "</think>a1" + EOS + USER + "q2" + ASSISTANT + "<think>r2</think>a2" + EOS
    )
    kept = render_prompt(messages, thinking_mode="thinking", drop_thinking=False)
    assert kept == (
        BOS
        + USER
        + "q1"
        + ASSISTANT
        + "<think>r1</think>a1"
        + EOS
        + USER
        + "q2"
        + ASSISTANT
        + "<think>r2</think>a2"
        + EOS
    )


def test_tools_anywhere_keep_all_reasoning() -> None:
    messages = [
        {"role": "system", "content": "s", "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    prompt = render_prompt(messages, thinking_mode="thinking")
    assert USER + "q1" + ASSISTANT + "<think>r1</think>a1" + EOS in prompt
    assert prompt.endswith(USER + "q2" + ASSISTANT + "<think>")


def test_request_level_tools_join_the_system_message_or_stand_alone() -> None:
    section = render_tools([WEATHER_TOOL])
    assert (
        section.startswith("## Tools\n\n") and '{"name": "get_weather", "description": "Weather of a city"' in section
    )
    user = {"role": "user", "content": "hi"}
    with_system = render_prompt([SYSTEM, user], tools=[WEATHER_TOOL])
    assert with_system == BOS + "You are helpful.\n\n" + section + USER + "hi" + ASSISTANT + "</think>"
    assert render_prompt([{**SYSTEM, "tools": [WEATHER_TOOL]}, user]) == with_system
    without_system = render_prompt([user], tools=[WEATHER_TOOL])
    assert without_system == BOS + "\n\n" + section + USER + "hi" + ASSISTANT + "</think>"


def test_response_format_follows_the_tools() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    prompt = render_prompt([SYSTEM, {"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], response_format=schema)
    expected_tail = (
        "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        + json.dumps(schema, ensure_ascii=False)
        + USER
    )
    assert render_tools([WEATHER_TOOL]) + expected_tail in prompt


def test_assistant_tool_calls_and_results_in_call_order() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                _call("a", "get_weather", {"city": "Paris"}),
                _call("b", "get_weather", {"city": "Rome", "days": 2}),
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "rainy"},
        {
            "role": "tool",
            "tool_call_id": "a",
            "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "22C"}],
        },
        {"role": "user", "content": "thanks"},
    ]
    prompt = render_prompt(messages)
    dsml = (
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>"
    )
    results = "<tool_result>sunny\n\n22C</tool_result>\n\n<tool_result>rainy</tool_result>\n\nthanks"
    assert prompt == (
        BOS + USER + "weather?" + ASSISTANT + "</think>Checking." + dsml + EOS + USER + results + ASSISTANT + "</think>"
    )


def test_consecutive_user_messages_share_a_turn() -> None:
    messages = [
        SYSTEM,
        {"role": "user", "content": "One"},
        {"role": "user", "content": [{"type": "text", "text": "Two"}]},
    ]
    assert render_prompt(messages) == BOS + "You are helpful." + USER + "One\n\nTwo" + ASSISTANT + "</think>"


def test_developer_turns() -> None:
    messages = [SYSTEM, {"role": "developer", "content": "rules"}]
    assert render_prompt(messages) == BOS + "You are helpful." + USER + "rules" + ASSISTANT + "</think>"
    # In thinking mode with dropping, developer turns before the last user turn are left out.
    history = [
        {"role": "developer", "content": "old rules"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "q"},
    ]
    assert render_prompt(history, thinking_mode="thinking") == BOS + "ok" + EOS + USER + "q" + ASSISTANT + "<think>"
    assert "old rules" in render_prompt(history, thinking_mode="chat")


def test_latest_reminder() -> None:
    messages = [SYSTEM, {"role": "latest_reminder", "content": "2026-02-21"}, {"role": "user", "content": "q"}]
    assert render_prompt(messages) == (
        BOS + "You are helpful.<｜latest_reminder｜>2026-02-21" + USER + "q" + ASSISTANT + "</think>"
    )
    # Official rule: a user turn followed by a reminder still gets the assistant hand-over.
    trailing = render_prompt([{"role": "user", "content": "q"}, {"role": "latest_reminder", "content": "r"}])
    assert trailing == BOS + USER + "q" + ASSISTANT + "</think><｜latest_reminder｜>r"


def test_quick_instruction_tasks() -> None:
    query = render_prompt([{"role": "user", "content": "find it", "task": "query"}])
    assert query == BOS + USER + "find it<｜query｜>"
    action = [{"role": "user", "content": "go", "task": "action"}, {"role": "assistant", "content": "Search"}]
    assert render_prompt(action, thinking_mode="thinking") == (
        BOS + USER + "go" + ASSISTANT + "<think><｜action｜>Search" + EOS  # task output carries no reasoning
    )


def test_unfinished_final_assistant_turn() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is", "wo_eos": True}]
    assert render_prompt(messages) == BOS + USER + "q" + ASSISTANT + "</think>The answer is"


def test_chat_encoder_returns_text_and_ids() -> None:
    tokenizer = Tokenizer.from_pretrained()
    messages, gold = _official_case(1)
    encoded = ChatEncoder(tokenizer).encode(messages, thinking_mode="thinking")
    assert encoded.text == gold
    assert encoded.token_ids == tokenizer.encode(gold)
    special = tokenizer.special
    assert encoded.token_ids[0] == special.bos and encoded.token_ids[-1] == special.eos
    for marker_id in (special.user, special.assistant, special.think_start, special.think_end, special.dsml):
        assert marker_id in encoded.token_ids
    prompt = ChatEncoder(tokenizer).encode([{"role": "user", "content": "你好"}])
    assert prompt.token_ids == [
        special.bos,
        special.user,
        *tokenizer.encode("你好"),
        special.assistant,
        special.think_end,
    ]


@pytest.mark.parametrize(
    ("messages", "kwargs", "message"),
    [
        ([{"role": "robot", "content": "x"}], {}, "unknown role 'robot'"),
        ([{"content": "x"}], {}, "unknown role None"),
        (["hello"], {}, "must be an object"),
        ("hello", {}, "must be a list"),
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], {}, "without a preceding assistant"),
        (
            [
                {"role": "assistant", "content": "", "tool_calls": [_call("a", "f", {})]},
                {"role": "tool", "tool_call_id": "z", "content": "r"},
            ],
            {},
            "matches no call",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{bad"}}],
                }
            ],
            {},
            "not valid JSON",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            {},
            "must be a JSON object",
        ),
        ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}], {}, "no function name"),
        ([{"role": "developer", "content": ""}], {}, "non-empty content"),
        ([{"role": "user", "content": None}], {}, "needs content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "only text content"),
        ([{"role": "user", "content": "q", "task": "dance"}], {}, "unknown task"),
        ([{"role": "user", "content": "q"}], {"thinking_mode": "deep"}, "thinking_mode"),
        ([{"role": "user", "content": "q"}], {"reasoning_effort": "low"}, "reasoning_effort"),
        ([{"role": "user", "content": "q"}], {"tools": [{"type": "function"}]}, "non-empty 'name'"),
        (
            [{"role": "user", "content": "q"}],
            {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
            "type 'function'",
        ),
    ],
)
def test_bad_input_raises_a_clear_value_error(messages: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_prompt(messages, **kwargs)


def test_reasoning_alias_and_content_parts_for_assistant_turns() -> None:
    # Clients that echo vLLM-style `reasoning`, or send content as text parts, get the same prompt.
    canonical = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab", "reasoning_content": "r"},
    ]
    variant = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "reasoning": "r",
        },
    ]
    expected = BOS + USER + "q" + ASSISTANT + "<think>r</think>ab" + EOS
    assert render_prompt(canonical, thinking_mode="thinking") == render_prompt(variant, thinking_mode="thinking")
    assert render_prompt(variant, thinking_mode="thinking") == expected
