"""Whether one request is prefilled by the prefill pool (disaggregated) or by the decode worker itself (local)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv4.protocol.config import DisaggregationConfig


@dataclass(frozen=True)
class PrefillDecision:
    """The choice and its reason (a metric label and a span attribute)."""

    disaggregate: bool
    reason: Literal[
        "mode_always", "mode_never", "short_prompt", "prefill_queue_full", "no_prefill_workers", "long_prompt"
    ]


def decide_prefill(
    prompt_tokens: int, prefill_queue_depth: int, prefill_workers: int, policy: DisaggregationConfig
) -> PrefillDecision:
    """Short prompts, a long prefill queue, or no prefill worker alive → decode prefills locally (mode `auto`).

    `prefill_queue_depth` counts jobs waiting for a prefill worker (the group's lag); `prefill_workers` counts
    consumers of the prefill group. Mode `always` disaggregates even with no prefill worker (the job waits for one,
    loudly visible as queue lag); mode `never` never does.
    """
    if policy.mode == "always":
        return PrefillDecision(True, "mode_always")
    if policy.mode == "never":
        return PrefillDecision(False, "mode_never")
    if prompt_tokens < policy.min_prompt_tokens:
        return PrefillDecision(False, "short_prompt")
    if prefill_workers == 0:
        return PrefillDecision(False, "no_prefill_workers")
    if prefill_queue_depth >= policy.max_prefill_queue:
        return PrefillDecision(False, "prefill_queue_full")
    return PrefillDecision(True, "long_prompt")
