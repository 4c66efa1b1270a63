"""The DeepSeek-V4 chat encoding: OpenAI-style messages and tools in, the prompt text and its ids out.

It follows the rules of DeepSeek's official `encoding/encoding_dsv4.py` (MIT; the checkpoints ship no Jinja
template); `docs/chat-format.md` spells them out. In short: BOS, then every message in order; the system text has
no role marker; a user or developer turn is `<｜User｜>text`, and when an assistant turn or the end follows it
gets `<｜Assistant｜>` plus `<think>` (thinking mode) or `</think>` (chat mode); an assistant turn is
`[reasoning</think>]content[DSML tool calls]<｜end▁of▁sentence｜>`; tool results are merged into a user turn as
`<tool_result>…</tool_result>` blocks in call order. In thinking mode the reasoning of turns before the last
user message is dropped unless some message carries tools.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dsv4.model_runtime.chat_tokens import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
)
from dsv4.model_runtime.dsml import render_tool_calls, to_json, tool_call_arguments
from dsv4.model_runtime.tokenizer import Tokenizer

ThinkingMode = Literal["chat", "thinking"]
ReasoningEffort = Literal["high", "max"]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "latest_reminder"})
REASONING_EFFORTS: tuple[str | None, ...] = (None, "high", "max")

REASONING_EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

_TOOLS_SECTION_HEAD = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_SECTION_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The "## Tools" section for OpenAI-style `tools` (one JSON line per function schema)."""
    return _tools_section(_tool_functions(tools))


def _tools_section(functions: Sequence[Mapping[str, Any]]) -> str:
    return _TOOLS_SECTION_HEAD + "\n".join(to_json(fn) for fn in functions) + _TOOLS_SECTION_TAIL


def _tool_functions(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise ValueError("'tools' must be a list of {'type': 'function', 'function': {...}} objects")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be an object with type 'function'")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}] needs a 'function' object with a non-empty 'name'")
        functions.append(dict(function))
    return functions


def _text_parts(content: Any, where: str) -> list[str]:
    """Content as a list of text parts: a string is one part; OpenAI content arrays may hold text parts only
    (the model reads no images)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}: only text content parts are supported, got {kind!r}")
            parts.append(part["text"])
        return parts
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _normalize(messages: Any, tools: Any, response_format: Any) -> list[dict[str, Any]]:
    """Validated copies of the messages in the shape the renderer reads; ValueError on anything malformed."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError("'messages' must be a list of message objects")
    result: list[dict[str, Any]] = []
    open_calls: list[Mapping[str, Any]] | None = None  # tool calls of the latest assistant turn
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
        role = raw.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {sorted(ROLES)}")
        msg: dict[str, Any] = {"role": role}
        task = raw.get("task")
        if task is not None:
            if task not in TASK_TOKENS:
                raise ValueError(f"{where}: unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
            msg["task"] = task
        if raw.get("wo_eos"):
            msg["wo_eos"] = True
        content = raw.get("content")
        if role in ("system", "developer"):
            text = "" if content is None else "".join(_text_parts(content, where))
            if role == "developer" and not text:
                raise ValueError(f"{where}: a developer message needs non-empty content")
            msg["content"] = text
            if raw.get("tools"):
                msg["tools"] = _tool_functions(raw["tools"])
            if raw.get("response_format"):
                msg["response_format"] = raw["response_format"]
        elif role == "user":
            if content is None:
                raise ValueError(f"{where}: a user message needs content")
            msg["parts"] = _text_parts(content, where)
        elif role == "latest_reminder":
            if content is None:
                raise ValueError(f"{where}: a latest_reminder message needs content")
            msg["content"] = "".join(_text_parts(content, where))
        elif role == "assistant":
            msg["content"] = "" if content is None else "".join(_text_parts(content, where))
            reasoning = raw.get("reasoning_content", raw.get("reasoning"))
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"{where}: reasoning_content must be a string")
            msg["reasoning_content"] = reasoning or ""
            calls = raw.get("tool_calls") or []
            if not isinstance(calls, Sequence) or isinstance(calls, str):
                raise ValueError(f"{where}: tool_calls must be a list")
            for call in calls:
                try:
                    tool_call_arguments(call)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from exc
            msg["tool_calls"] = list(calls)
            open_calls = list(calls)
        else:  # tool
            if not open_calls:
                raise ValueError(f"{where}: tool message without a preceding assistant tool call")
            call_id = raw.get("tool_call_id") or ""
            known_ids = [_call_id(call) for call in open_calls if _call_id(call)]
            if call_id and known_ids and call_id not in known_ids:
                raise ValueError(f"{where}: tool_call_id {call_id!r} matches no call of the preceding assistant turn")
            if content is None:
                raise ValueError(f"{where}: a tool message needs content")
            msg["tool_call_id"] = call_id
            msg["content"] = "\n\n".join(_text_parts(content, where))
        result.append(msg)
    if tools or response_format:
        _attach_request_level(result, tools, response_format)
    return result


def _call_id(call: Mapping[str, Any]) -> str:
    function = call.get("function")
    nested = function.get("id", "") if isinstance(function, Mapping) else ""
    return str(call.get("id") or nested or "")


def _attach_request_level(messages: list[dict[str, Any]], tools: Any, response_format: Any) -> None:
    """Request-level tools / response_format go on the leading system or developer message (a bare system
    message is inserted when there is none), so the prompt reads `{system}\\n\\n## Tools…` as in the official
    test vectors; they replace what that message carried."""
    if not messages or messages[0]["role"] not in ("system", "developer"):
        messages.insert(0, {"role": "system", "content": ""})
    head = messages[0]
    if tools:
        head["tools"] = _tool_functions(tools)
    if response_format:
        head["response_format"] = response_format


def _merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results become `tool_result` blocks of a user turn; consecutive user turns (without a task) share
    one turn, their blocks joined by a blank line."""
    merged: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        last = merged[-1] if merged else None
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg["tool_call_id"], "content": msg["content"]}
            if last is not None and last["role"] == "user" and "blocks" in last:
                last["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            blocks = [{"type": "text", "text": part} for part in msg["parts"]]
            if last is not None and last["role"] == "user" and "blocks" in last and last.get("task") is None:
                last["blocks"].extend(blocks)
            else:
                merged.append({k: v for k, v in msg.items() if k != "parts"} | {"blocks": blocks})
        else:
            merged.append(copy.copy(msg))
    return merged


def _sort_tool_results(messages: list[dict[str, Any]]) -> None:
    """Within each user turn, order the tool results as the latest assistant turn ordered its calls."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg["tool_calls"]:
            order = {cid: i for i, call in enumerate(msg["tool_calls"]) if (cid := _call_id(call))}
        elif msg["role"] == "user" and order:
            results = [b for b in msg["blocks"] if b["type"] == "tool_result"]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda b: order.get(b["tool_use_id"], 0)))
                msg["blocks"] = [next(ordered) if b["type"] == "tool_result" else b for b in msg["blocks"]]


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user turn: assistant turns lose their reasoning and developer turns are dropped."""
    last_user = _last_user_index(messages)
    kept: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if msg["role"] in ("user", "system", "latest_reminder") or i >= last_user:
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append(msg | {"reasoning_content": ""})
    return kept


def _render_head_extras(msg: Mapping[str, Any]) -> str:
    text = ""
    if msg.get("tools"):
        text += "\n\n" + _tools_section(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT_HEAD + to_json(msg["response_format"])
    return text


def _render_block(block: Mapping[str, Any]) -> str:
    if block["type"] == "tool_result":
        return f"<tool_result>{block['content']}</tool_result>"
    return str(block["text"])


def _render_message(
    index: int,
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: ThinkingMode,
    drop_thinking: bool,
    reasoning_effort: str | None,
) -> str:
    msg = messages[index]
    role = msg["role"]
    thinking = thinking_mode == "thinking"
    last_user = _last_user_index(messages)
    text = REASONING_EFFORT_MAX_PREFIX if index == 0 and thinking and reasoning_effort == "max" else ""

    if role == "system":
        text += msg["content"] + _render_head_extras(msg)
    elif role == "developer":
        text += USER + msg["content"] + _render_head_extras(msg)
    elif role == "user":
        text += USER + "\n\n".join(_render_block(b) for b in msg["blocks"])
    elif role == "latest_reminder":
        text += LATEST_REMINDER + msg["content"]
    else:  # assistant
        calls = render_tool_calls(msg["tool_calls"]) if msg["tool_calls"] else ""
        after_task = index > 0 and messages[index - 1].get("task") is not None
        reasoning = ""
        if thinking and not after_task and (not drop_thinking or index > last_user):
            reasoning = msg["reasoning_content"] + THINK_END
        text += reasoning + msg["content"] + calls + ("" if msg.get("wo_eos") else EOS)

    # The turn hand-over is written only before an assistant or latest_reminder turn, or at the end.
    if index + 1 < len(messages) and messages[index + 1]["role"] not in ("assistant", "latest_reminder"):
        return text
    task = msg.get("task")
    if task is not None:
        if task == "action":
            text += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            text += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop_thinking or index >= last_user)
        text += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return text


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Mapping[str, Any] | None = None,
    thinking_mode: ThinkingMode = "chat",
    reasoning_effort: ReasoningEffort | None = None,
    drop_thinking: bool = True,
    add_bos: bool = True,
) -> str:
    """The prompt text of a conversation, by the official DeepSeek-V4 rules.

    `messages`: OpenAI-style dicts (role system|developer|user|assistant|tool, plus the official
    `latest_reminder`; content, reasoning_content, tool_calls, tool_call_id; `name` is ignored; the official
    extras `task` and `wo_eos` are honoured). `tools` / `response_format`: request-level, attached to the
    leading system or developer message. When the conversation ends with a user or developer turn the
    generation prompt (`<｜Assistant｜>` + `<think>` or `</think>`) is appended; a final assistant turn is
    rendered complete (with EOS) unless it has `wo_eos`. ValueError on malformed input.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    normalized = _normalize(messages, tools, response_format)
    merged = _merge_tool_messages(normalized)
    _sort_tool_results(merged)
    effective_drop = drop_thinking and not any(m.get("tools") for m in merged)
    if thinking_mode == "thinking" and effective_drop:
        merged = _drop_thinking(merged)
    prompt = BOS if add_bos else ""
    for index in range(len(merged)):
        prompt += _render_message(index, merged, thinking_mode, effective_drop, reasoning_effort)
    return prompt


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt and its token ids."""

    text: str
    token_ids: list[int]


class ChatEncoder:
    """Renders conversations with `render_prompt` and tokenizes them with the model's tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        thinking_mode: ThinkingMode = "chat",
        reasoning_effort: ReasoningEffort | None = None,
        drop_thinking: bool = True,
    ) -> EncodedPrompt:
        """The prompt text and ids for a chat request (see `render_prompt` for the arguments)."""
        text = render_prompt(
            messages,
            tools=tools,
            response_format=response_format,
            thinking_mode=thinking_mode,
            reasoning_effort=reasoning_effort,
            drop_thinking=drop_thinking,
        )
        return EncodedPrompt(text=text, token_ids=self.tokenizer.encode(text))
