"""Per-request sampling parameters of the engine (the vLLM names): the port's `SamplingSpec` plus what only an
in-process caller sets (stop strings, detokenization), validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv4.model_runtime.engine.port import SamplingSpec


@dataclass(frozen=True)
class SamplingParams(SamplingSpec):
    """How one request is sampled and when it stops.

    `seed=None` draws a random seed when the request is added; a seeded request draws its generated token i from an
    RNG seeded by (seed, i), so its tokens do not depend on the batch or on where a resumed decode restarts.
    `logprobs=k` returns the sampled token's log-probability and the k most likely alternatives (of the raw model
    distribution, before penalties and temperature). Stop strings are cut from the text exactly (the stop string
    itself is not returned); stop token ids and EOS end the request with the token in `token_ids` but not in `text`.
    """

    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        super().__post_init__()
        if not all(stop):
            raise ValueError("SamplingParams: stop strings must not be empty")

    @classmethod
    def from_spec(cls, spec: SamplingSpec) -> SamplingParams:
        """The engine's parameters for a queue entry's `SamplingSpec` (stop strings stay with the gateway)."""
        return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(SamplingSpec)})
