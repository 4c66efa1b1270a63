"""One request inside the engine: its tokens, how many of them the KV state holds, and its outputs so far."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.text_stream import TextStream

if TYPE_CHECKING:
    from dsv4.model_runtime.engine.kv_export import KVSnapshot
    from dsv4.model_runtime.engine.prefix_cache import Prompt
    from dsv4.model_runtime.state import SequenceState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the `top` most likely tokens with theirs (best first)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Request:
    """A request: prompt + generated ids; `num_computed` of them are in `state` (the rest are fed next).

    Generated token i (index into `output_token_ids`) is sampled after the model consumed all tokens before it;
    tokens present at admission (a resumed decode's already-streamed ids) are replayed, not sampled again.

    Requests compare by identity: the scheduler's `in` / `remove` over its lists must find this request, not one
    with equal fields, and a field-by-field comparison (token lists included) made each step's scheduling
    O(batch^2) list compares: 4 ms a step at batch 64 on the CI machine, more than the GPU step it feeds.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_id: int | None
    text: TextStream | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    state: SequenceState | None = None
    snapshot: KVSnapshot | None = None  # an imported state of the prompt, restored when the sequence gets a slot
    export_after_prefill: bool = False  # prefill-only request: stop after token 0 and keep the state to export
    num_preemptions: int = 0
    # MTP speculative decoding (dsv4.model_runtime.engine.speculative): whether the MTP module follows this sequence
    # (its state then holds the MTP layers' cache too), and the draft for the token after the last one.
    use_mtp: bool = False
    draft: int | None = None
    # Prefix cache (dsv4.model_runtime.engine.prefix_cache): the tokens (and their chain hashes) the state must hold
    # before the next token is sampled, set at admission; the positions where a snapshot is taken, ascending.
    prefill_len: int = 0
    prefix: Prompt | None = None
    cache_points: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_replayed = len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def num_generated(self) -> int:
        """Tokens generated so far, replayed ones included (= the index of the next generated token)."""
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record a newly sampled token and decide whether the request is finished."""
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        p = self.params
        is_eos = token_id == self.eos_token_id and not p.ignore_eos
        if is_eos or token_id in p.stop_token_ids:
            self.finish("stop")
            return
        if self.text is not None:
            self.text.add(token_id)
            if self.text.stopped:
                self.finish("stop")
                return
        if self.num_generated >= p.max_tokens or self.export_after_prefill:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.text is not None and reason != "cancelled":
            self.text.finish()
            if self.text.stopped:  # a stop string that only the end of the text could confirm (overlapping stops)
                reason = "stop"
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
