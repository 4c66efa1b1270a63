"""Per-request sampling parameters of the engine (the vLLM names), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.services.engine_port import SamplingSpec

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's convention)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    `seed=None` draws a random seed when the request is added; a seeded request draws its generated token i from an
    RNG seeded by (seed, i), so its tokens do not depend on the batch or on where a resumed decode restarts.
    `logprobs=k` returns the sampled token's log-probability and the k most likely alternatives (of the raw model
    distribution, before penalties and temperature). Stop strings are cut from the text exactly (the stop string
    itself is not returned); stop token ids and EOS end the request with the token in `token_ids` but not in `text`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def from_spec(cls, spec: SamplingSpec) -> SamplingParams:
        """The engine's parameters for a queue entry's `SamplingSpec` (stop strings stay with the gateway)."""
        return cls(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            min_p=spec.min_p,
            seed=spec.seed,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=spec.repetition_penalty,
            stop_token_ids=spec.stop_token_ids,
            ignore_eos=spec.ignore_eos,
            logprobs=spec.logprobs,
        )
