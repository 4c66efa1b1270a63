"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (FastAPI publishes them in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsv4.model_runtime.engine.port import MAX_LOGIT_BIAS

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_N = 64
MAX_CHOICES = 128  # prompts x n of one request: each choice is a queue request of its own

TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str = Field(min_length=1)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "latest_reminder"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_rules(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "assistant" and self.tool_calls:
            raise ValueError("only assistant messages carry tool_calls")
        return self


class ThinkingOption(_Body):
    type: Literal["enabled", "disabled"]


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = None
    ignore_eos: bool = False
    logit_bias: Annotated[
        dict[
            Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],  # token ids, as OpenAI's JSON keys spell them
            Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)],
        ],
        Field(max_length=MAX_LOGIT_BIAS_ENTRIES, json_schema_extra={"additionalProperties": False}),
    ] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stop_rules(self) -> _Sampling:
        for s in self.stop_list():
            if not s:
                raise ValueError("stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs."""
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatPrompt(_Body):
    """What renders a chat into a prompt: the messages and what the encoding puts around them (shared by
    `/v1/chat/completions` and `/tokenize`)."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: Literal["high", "max"] | None = None
    thinking: ThinkingOption | None = None  # DeepSeek API style
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM style: {"thinking": true}

    @model_validator(mode="after")
    def _tool_rules(self) -> ChatPrompt:
        names = {t.function.name for t in self.tools or []}
        if len(names) != len(self.tools or []):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def thinking_mode(self) -> Literal["chat", "thinking"]:
        if self.thinking is not None:
            return "thinking" if self.thinking.type == "enabled" else "chat"
        if self.chat_template_kwargs and self.chat_template_kwargs.get("thinking"):
            return "thinking"
        return "chat"


class ChatCompletionRequest(_Sampling, ChatPrompt):
    """`POST /v1/chat/completions`."""

    max_completion_tokens: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprob_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def requested_logprobs(self) -> int | None:
        """How many alternatives per token to report (0: only the sampled token's), or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt (text or token ids) or a batch of them (a list of texts or of id lists);
    the response has `n` choices per prompt, prompt by prompt."""

    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)]
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_form(cls, value: Any) -> Any:
        # pydantic's own message for a union lists every member's failure; name the four accepted forms instead
        forms = (str, int, list)
        if isinstance(value, list) and value and len({type(v) for v in value if isinstance(v, forms)}) != 1:
            raise ValueError(
                "prompt must be a string, a list of token ids, a list of strings or a list of token id lists"
            )
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported: the prompt's logprobs are not computed")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported: only best_of equal to n (every choice is returned)")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts x n) per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    def requested_logprobs(self) -> int | None:
        """How many alternatives per token to report (0: only the sampled token's), or None for no logprobs."""
        return self.logprobs

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeTextRequest(_Body):
    """`POST /tokenize` of a completion prompt (vLLM's endpoint)."""

    model: str = Field(min_length=1)
    prompt: str


class DetokenizeRequest(_Body):
    """`POST /detokenize` (vLLM's endpoint)."""

    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]]
