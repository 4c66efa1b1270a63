"""The engine's port: exactly what the serving workers (`dsv4.services`) call, and the types that cross it.

The engine (`AsyncEngine`) implements `Engine`; the workers only ever see this module, which imports nothing but
the standard library, so the serving path (queues, handoff, gateway) is built and tested without importing torch.
Token indexes count generated tokens only: index 0 is the first token, produced by the prefill.

Determinism contract (the failure policy depends on it): a decode that resumes from an imported KV state plus the
tokens already streamed, or from a recompute of prompt + streamed tokens, must produce exactly the tokens the
original worker would have produced. For sampled requests the engine must therefore draw token `i` from an RNG
seeded by (`SamplingSpec.seed`, `i`), never from a per-process stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled", "error"]


GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's convention)
MAX_LOGIT_BIAS = 100.0  # |bias| OpenAI accepts per token


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one request, as they travel in queue entries (JSON-able, engine-independent).

    Validated on construction (ValueError naming the field), so a malformed queue entry is refused where it is read.
    Stop strings are matched by the gateway on detokenized text; the engine only sees token ids. `logit_bias`:
    (token id, bias) pairs added to the logits before penalties and sampling (OpenAI's field; a mapping or pairs are
    accepted and kept as pairs sorted by id); logprobs stay those of the model's own distribution.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = tuple(sorted((int(t), float(b)) for t, b in pairs))
        object.__setattr__(self, "logit_bias", bias)
        ids = [t for t, _ in bias]
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
            (all(t >= 0 for t in ids), f"logit_bias token ids must be >= 0, got {ids[:1]}"),
            (len(set(ids)) == len(ids), "logit_bias names a token id twice"),
            (
                all(abs(b) <= MAX_LOGIT_BIAS for _, b in bias),
                f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (before penalties and temperature) and the
    `SamplingSpec.logprobs` most likely tokens as (id, log-probability), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class KVMeta:
    """What the engine states about an exported KV state; the handoff descriptor carries it verbatim."""

    format_version: int
    model_fingerprint: str
    total_bytes: int
    num_tokens: int  # positions covered by the state (the prompt length after prefill)


@dataclass(frozen=True)
class PrefillOutput:
    """A finished prefill: the first generated token and the exported KV state as a stream of byte chunks.

    `kv_chunks` yields exactly `kv_meta.total_bytes` bytes in order, cut by the engine at its export chunk size;
    the handoff stores each chunk as one value, so the worker builds the engine with the handoff's chunk size. It is
    consumed once, by the handoff writer.
    """

    first_token: int
    kv_meta: KVMeta
    kv_chunks: Iterator[bytes]
    prompt_tokens: int
    first_token_logprobs: TokenLogprobs | None = None  # when the spec asked for logprobs
    # Set when token 0 already ends the request (EOS or a stop token, unless ignored); the worker then ends the
    # stream at once and hands nothing over.
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class TokenOutput:
    """One generated token of a decode; `finish_reason` is set on the last one."""

    index: int
    token_id: int
    finish_reason: FinishReason | None = None
    logprobs: TokenLogprobs | None = None  # when the spec asked for logprobs


@dataclass(frozen=True)
class EngineStats:
    """Load figures the workers export as metrics and readiness."""

    running_requests: int
    waiting_requests: int
    kv_cache_used_blocks: int
    kv_cache_total_blocks: int
    extra: dict[str, float] = field(default_factory=dict)


class KVImportError(ValueError):
    """The engine rejected a KV blob (bad format, wrong model, inconsistent positions); the worker recomputes."""


@dataclass(frozen=True)
class PrefixEvent:
    """A prompt prefix the engine's prefix cache started (`stored`) or stopped (`evicted`) holding, named by the
    chain hash of its last block (`dsv4.model_runtime.engine.prefix_hash`; only block-aligned prefixes are named)."""

    op: Literal["stored", "evicted"]
    chain_hash: str


@runtime_checkable
class Engine(Protocol):
    """The model engine as the workers use it. All coroutines run on the worker's event loop and must not block it.

    Requests are identified by the worker-chosen `request_id`; a request id is live from `prefill`/`submit_decode`
    until its stream ended or it was cancelled.
    """

    @property
    def model_fingerprint(self) -> str:
        """Hash of config + tensor names/shapes; a KV state only imports into an engine with the same fingerprint."""
        ...

    @property
    def kv_format_version(self) -> int:
        """Version of the KV export format this engine writes and reads."""
        ...

    async def prefill(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingSpec) -> PrefillOutput:
        """Run the prefill of `prompt_ids` (batched with other prefills), sample token 0, export the KV state.

        The engine frees the request's KV blocks once `kv_chunks` is exhausted or garbage-collected.
        """
        ...

    async def submit_decode(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: SamplingSpec,
        *,
        kv_blob: bytes | None,
        streamed_ids: Sequence[int],
    ) -> None:
        """Admit a request into the decode batch.

        With `kv_blob`: import it (the state after the prompt, as `prefill` exported it) and replay `streamed_ids`
        (tokens 0..n-1 already sent to the client, n ≥ 1) so generation continues at index n. Raises
        `KVImportError` when the blob does not fit this engine; the caller then resubmits with `kv_blob=None`.
        Without `kv_blob`: prefill `prompt_ids` + `streamed_ids` locally (local prefill or recompute); if
        `streamed_ids` is empty the first token of the stream is index 0.
        """
        ...

    def stream(self, request_id: str) -> AsyncIterator[TokenOutput]:
        """The tokens of a submitted decode, in index order, ending with the one that has `finish_reason` set."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Stop a request and free its state; its stream ends with finish_reason "cancelled". Idempotent."""
        ...

    def stats(self) -> EngineStats:
        """Current batch and KV-cache figures (cheap; called for every metrics scrape)."""
        ...

    # ---- prefix cache: what the workers share through Redis (the prefix tier, KV events) -------------------------
    @property
    def prefix_block_size(self) -> int | None:
        """Tokens per block of the prefix cache's chain hashes (seeded with `model_fingerprint`); None when the
        engine caches no prefixes."""
        ...

    async def cached_prefix_len(self, prompt_ids: Sequence[int]) -> int:
        """How many leading positions of `prompt_ids` a prefill would take from the cache instead of computing."""
        ...

    async def import_prefix(self, token_ids: Sequence[int], blob: bytes) -> bool:
        """Cache the exported state (`PrefillOutput` format) of exactly `token_ids`, which another engine computed.

        Raises `KVImportError` when the blob does not verify against this engine or covers other positions (the
        caller then drops it); False when it is cached already or there is no room."""
        ...

    async def export_prefix(self, chain_hash: str) -> bytes | None:
        """The exported state of the block-aligned prefix named `chain_hash`, None when the cache does not hold it."""
        ...

    def prefix_events(self) -> list[PrefixEvent]:
        """Prefixes stored and evicted since the last call (cheap, non-blocking)."""
        ...

    async def held_prefixes(self) -> list[str]:
        """Chain hashes of every block-aligned prefix the cache holds now."""
        ...
