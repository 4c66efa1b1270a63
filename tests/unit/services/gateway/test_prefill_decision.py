"""The per-request disaggregation choice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv4.protocol.config import DisaggregationConfig
from dsv4.services.gateway.decision import decide_prefill

pytestmark = pytest.mark.unit

AUTO = DisaggregationConfig(mode="auto", min_prompt_tokens=512, max_prefill_queue=8)


@pytest.mark.parametrize(
    ("prompt", "depth", "workers", "disagg", "reason"),
    [
        (511, 0, 2, False, "short_prompt"),
        (512, 0, 2, True, "long_prompt"),
        (512, 7, 2, True, "long_prompt"),
        (512, 8, 2, False, "prefill_queue_full"),
        (100_000, 0, 0, False, "no_prefill_workers"),
    ],
)
def test_auto_thresholds(prompt: int, depth: int, workers: int, disagg: bool, reason: str) -> None:
    d = decide_prefill(prompt, depth, workers, AUTO)
    assert (d.disaggregate, d.reason) == (disagg, reason)


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.integers(0, 10))
def test_fixed_modes_ignore_load(prompt: int, depth: int, workers: int) -> None:
    assert decide_prefill(prompt, depth, workers, DisaggregationConfig(mode="always")).disaggregate
    assert not decide_prefill(prompt, depth, workers, DisaggregationConfig(mode="never")).disaggregate


@given(st.integers(0, 10**6), st.integers(0, 10**4), st.integers(1, 10))
def test_auto_is_monotone_in_prompt_length_and_queue_depth(prompt: int, depth: int, workers: int) -> None:
    # A longer prompt never turns disaggregation off; a longer queue never turns it on.
    if decide_prefill(prompt, depth, workers, AUTO).disaggregate:
        assert decide_prefill(prompt + 1, depth, workers, AUTO).disaggregate
    else:
        assert not decide_prefill(prompt, depth + 1, workers, AUTO).disaggregate


def test_operator_config_names_are_accepted() -> None:
    s = DisaggregationConfig.model_validate({"mode": "never", "minPromptTokens": 3, "maxPrefillQueue": 4})
    assert (s.mode, s.min_prompt_tokens, s.max_prefill_queue) == ("never", 3, 4)
