"""The request bodies' own checks: the completion prompt's four forms and the fan-out limits."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from dsv4.services.gateway.schemas import MAX_CHOICES, CompletionRequest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [("x", ["x"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_a_prompt_is_text_ids_texts_or_id_lists(prompt: Any, prompts: list[Any]) -> None:
    assert CompletionRequest(model="m", prompt=prompt).prompts() == prompts


@pytest.mark.parametrize("prompt", [["a", [1]], [1, "a"], [[1], "a"], [None]])
def test_a_mixed_prompt_names_the_accepted_forms(prompt: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match="a list of strings or a list of token id lists"):
        CompletionRequest(model="m", prompt=prompt)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prompt": ["a"] * (MAX_CHOICES // 2 + 1), "n": 2}, f"at most {MAX_CHOICES} choices"),
        ({"prompt": "a", "n": 2, "best_of": 3}, "only best_of equal to n"),
        ({"prompt": "a", "echo": True, "logprobs": 0}, "echo with logprobs is not supported"),
        ({"prompt": "a", "suffix": "z"}, "suffix is not supported"),
    ],
)
def test_fan_out_limits(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        CompletionRequest.model_validate({"model": "m", **extra})
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a", "n": 2, "best_of": 2}).n == 2
