"""The OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`; vLLM's `/tokenize` and
`/detokenize`.

Each completion route turns its body into prompt token ids (the chat encoding, or the prompt as given) and hands
it to the request pipeline with the endpoint's response format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from dsv4.model_runtime.dsml import forced_tool_call_prefix
from dsv4.services.gateway import pipeline
from dsv4.services.gateway.errors import APIError, invalid
from dsv4.services.gateway.openai_format import ChatFormat, TextFormat, model_card
from dsv4.services.gateway.schemas import (
    ChatCompletionRequest,
    ChatPrompt,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeTextRequest,
)
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.gateway.state import GatewayState


def openai_routes(settings: GatewaySettings, authorize: Callable[[Request], Awaitable[None]]) -> APIRouter:
    """The routes, each behind `authorize`; they read the app's `GatewayState` from `request.app.state.gw`."""
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(settings.served_model_name, settings.max_model_len)]}

    @router.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(settings, model_id)
        return model_card(model_id, settings.max_model_len)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gw = _state(request)
        _check_model(settings, body.model)
        prompt_ids, forced = _chat_prompt(gw, body)
        prepared = pipeline.prepare(
            settings, "chatcmpl-", prompt_ids, body, body.max_new_tokens(), gw.tokenizer.vocab_size
        )
        choices = pipeline.fan_out([prepared], body.n)
        formats = [ChatFormat(body, prepared.request_id, gw.tokenizer, forced, i) for i in range(len(choices))]
        served = list(zip(choices, formats, strict=True))
        return await pipeline.serve(gw, request, served, "/v1/chat/completions", body.n)

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gw = _state(request)
        _check_model(settings, body.model)
        prompts = body.prompts()
        prepared = []
        for p, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
            if isinstance(prompt, str):
                ids = gw.tokenizer.encode(prompt)
            else:
                ids = list(prompt)
                if max(ids) >= gw.tokenizer.vocab_size:
                    raise invalid(f"{param}: token id {max(ids)} is outside the vocabulary", param=param)
            if not ids:
                raise invalid(f"{param} is empty", param=param)
            prepared.append(
                pipeline.prepare(settings, "cmpl-", ids, body, body.max_new_tokens(), gw.tokenizer.vocab_size)
            )
        choices = pipeline.fan_out(prepared, body.n)
        base = prepared[0].request_id
        # the prompts' texts, each decoded once, and only when echoed
        echoes = [(p if isinstance(p, str) else gw.tokenizer.decode(p)) if body.echo else "" for p in prompts]
        formats = [TextFormat(body, base, gw.tokenizer, i, echoes[i // body.n]) for i in range(len(choices))]
        return await pipeline.serve(gw, request, list(zip(choices, formats, strict=True)), "/v1/completions", body.n)

    @router.post("/tokenize")
    async def tokenize(body: ChatPrompt | TokenizeTextRequest, request: Request) -> dict[str, Any]:
        """vLLM's `/tokenize`: a completion prompt's ids, or the ids a chat renders to (as `/v1/chat/completions`
        would send them), with the context they count against."""
        gw = _state(request)
        _check_model(settings, body.model)
        ids = _chat_prompt(gw, body)[0] if isinstance(body, ChatPrompt) else gw.tokenizer.encode(body.prompt)
        return {"count": len(ids), "max_model_len": settings.max_model_len, "tokens": ids, "token_strs": None}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        """vLLM's `/detokenize`: the text of token ids."""
        gw = _state(request)
        _check_model(settings, body.model)
        outside = [t for t in body.tokens if t >= gw.tokenizer.vocab_size]
        if outside:
            raise invalid(f"tokens: token id {outside[0]} is outside the vocabulary", param="tokens")
        return {"prompt": gw.tokenizer.decode(body.tokens)}

    return router


def _chat_prompt(gw: GatewayState, body: ChatPrompt) -> tuple[list[int], str]:
    """The prompt ids a chat renders to (the official encoding, then the start of a forced tool call) and that
    start; a 400 naming `messages` when the encoding refuses them."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and body.tool_choice != "none" else None
    try:
        encoded = gw.encoder.encode(
            [m.model_dump(exclude_none=True) for m in body.messages],
            tools=tools,
            response_format=body.response_format,
            thinking_mode=body.thinking_mode(),
            reasoning_effort=body.reasoning_effort,
        )
    except ValueError as e:
        raise invalid(f"messages: {e}", param="messages") from e
    forced = _forced_tool_call(body)
    return encoded.token_ids + gw.tokenizer.encode(forced), forced


def _state(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gw
    return gw


def _forced_tool_call(body: ChatPrompt) -> str:
    """The assistant-turn start that enforces `tool_choice` "required" or a named function ("" otherwise).

    The block is opened in the prompt, so the model can only continue with tool calls (and, when named, inside
    that function's call); the arguments are not constrained to the schema. Thinking mode is refused: the block
    comes after the reasoning, whose end cannot be known in advance.
    """
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return ""
    if body.thinking_mode() == "thinking":
        raise invalid(
            "tool_choice 'required' or a named function cannot be enforced in thinking mode; "
            "use tool_choice 'auto' or turn thinking off",
            param="tool_choice",
        )
    return forced_tool_call_prefix(None if choice == "required" else choice.function.name)  # type: ignore[union-attr]


def _check_model(settings: GatewaySettings, model: str) -> None:
    if model != settings.served_model_name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this endpoint serves '{settings.served_model_name}'",
            param="model",
            code="model_not_found",
        )
