"""The settings a role reads from the file the operator mounts from its ConfigMap (`contract.CONFIG_FILE`).

One model per concern, used on both sides: the operator's CRD schema embeds `KvHandoffConfig`, `DisaggregationConfig`,
`ParallelismConfig`, `EngineStepConfig` and `PrefixTierConfig` (so the API server enforces the same limits the roles
accept), the operator writes a `GatewayFile` or `WorkerFile`, and each role parses its file with the same model.
Every key the operator writes is a field a role reads; unknown keys are an error on both sides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

MAX_CHUNK_BYTES = 4 << 20  # a KV handoff chunk is at most 4 MiB (one Redis value, pipelined)
MIN_CHUNK_BYTES = 64 << 10  # smaller chunks only multiply round trips
DEFAULT_HANDOFF_TTL_S = 120
MAX_HANDOFF_TTL_S = 3600  # a handoff's keys outlive a crash by at most an hour
DEFAULT_PREFIX_TIER_BYTES = 1 << 30
DEFAULT_PREFIX_TIER_TTL_S = 3600
MAX_PREFIX_TIER_TTL_S = 7 * 86400
DEFAULT_MAX_QUEUED_TOKENS = 32768
MAX_QUEUED_TOKENS_LIMIT = 1 << 24
MODEL_CONTEXT = 1 << 20  # DeepSeek-V4's context (max_position_embeddings, Flash and Pro alike): the gateway's default


class WireModel(BaseModel):
    """camelCase on the wire (as every Kubernetes API and the ConfigMap files), snake_case in Python; unknown fields
    are errors; immutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class KvHandoffConfig(WireModel):
    """How KV state travels from prefill to decode."""

    transport: Literal["redis", "direct"] = "redis"
    ttl_seconds: int = Field(
        default=DEFAULT_HANDOFF_TTL_S,
        ge=1,
        le=MAX_HANDOFF_TTL_S,
        description="lease on handoff keys; crashes clean up after it",
    )
    chunk_bytes: int = Field(default=MAX_CHUNK_BYTES, ge=MIN_CHUNK_BYTES, le=MAX_CHUNK_BYTES)


class DisaggregationConfig(WireModel):
    """When the gateway sends a request through the prefill pool rather than letting decode prefill it."""

    mode: Literal["auto", "always", "never"] = "auto"
    min_prompt_tokens: int = Field(default=512, ge=0, description="auto: shorter prompts are prefilled by decode")
    max_prefill_queue: int = Field(default=64, ge=0, description="auto: a longer prefill queue sends work to decode")


class ParallelismConfig(WireModel):
    """How one worker replica splits the model over its devices."""

    tensor: int = Field(default=1, ge=1, le=64)
    data: int = Field(default=1, ge=1, le=64)
    expert: bool = Field(default=False, description="expert parallel MoE across the replica's devices")


class PrefixTierConfig(WireModel):
    """The shared prefix tier: exported prompt prefixes in Redis, which every prefill worker can import."""

    budget_bytes: int = Field(
        default=DEFAULT_PREFIX_TIER_BYTES, ge=0, description="bytes of prefixes kept (LRU beyond); 0 = no shared tier"
    )
    ttl_seconds: int = Field(default=DEFAULT_PREFIX_TIER_TTL_S, ge=1, le=MAX_PREFIX_TIER_TTL_S)
    redis_url: str | None = Field(
        default=None, pattern=r"^rediss?://", description="a separate Redis for the tier (default: the deployment's)"
    )


class PrefixCacheConfig(WireModel):
    """What a worker does with prompt prefixes: its engine's cache, and the shared tier (prefill workers)."""

    enabled: bool = Field(default=True, description="the engine's prefix cache, its KV events and the shared tier")
    tier: PrefixTierConfig = Field(default_factory=PrefixTierConfig)


class EngineStepConfig(WireModel):
    """How a worker's engine runs its steps: its batch limits (vLLM's `--max-num-seqs`,
    `--max-num-batched-tokens`); graphs and overlap on an accelerator (a CPU runs its steps plainly whatever these
    two say), the switches users of vLLM (`--enforce-eager`) and SGLang (`--disable-cuda-graph`,
    `--disable-overlap-schedule`) reach for when a device misbehaves; and MTP speculative decoding (SGLang's
    `--speculative-algorithm NEXTN`), on any device."""

    max_num_seqs: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="sequences a step batches at most, which is also how many jobs the worker holds at once (decode "
        "graphs are captured up to its bucket); an accelerator's decode pool wants 64-256",
    )
    max_num_batched_tokens: int = Field(
        default=512,
        ge=16,
        le=262144,
        description="tokens a step computes at most (prompt chunks and decode rows together); an accelerator's "
        "prefill pool wants thousands",
    )

    cuda_graphs: bool = Field(
        default=True, description="replay decode steps from captured device graphs; false runs them eagerly"
    )
    overlap_scheduling: bool = Field(
        default=True,
        description="launch each step before the previous step's tokens reach the host (CUDA); false waits for them",
    )
    speculative_mtp: bool = Field(
        default=False,
        description="draft one token per decode step with the checkpoint's MTP module and verify it: the same tokens, "
        "up to two per step where drafts are accepted",
    )


class PrefixRoutingConfig(WireModel):
    """How the gateway picks a worker for a job by the prefixes the workers hold (KV events)."""

    enabled: bool = Field(default=True, description="push jobs to the worker holding their prefix")
    max_queued_tokens: int = Field(
        default=DEFAULT_MAX_QUEUED_TOKENS,
        ge=1,
        le=MAX_QUEUED_TOKENS_LIMIT,
        description="prompt tokens a worker may have waiting from this gateway before it counts as saturated",
    )


class GatewayFile(WireModel):
    """The gateway's settings file."""

    deployment: str
    served_model_name: str
    max_model_len: int = Field(
        default=MODEL_CONTEXT, ge=16, le=MODEL_CONTEXT, description="prompt + max_tokens a request may ask for"
    )
    disaggregation: DisaggregationConfig = Field(default_factory=DisaggregationConfig)
    prefix_routing: PrefixRoutingConfig = Field(default_factory=PrefixRoutingConfig)


class WorkerFile(WireModel):
    """A prefill or decode worker's settings file."""

    deployment: str
    kv_handoff: KvHandoffConfig = Field(default_factory=KvHandoffConfig)
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    prefix_cache: PrefixCacheConfig = Field(default_factory=PrefixCacheConfig)
    engine: EngineStepConfig = Field(default_factory=EngineStepConfig)
