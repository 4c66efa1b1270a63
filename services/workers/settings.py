"""Worker settings (`RoleSettings` sources: flags, `DSV4_*` environment, the mounted `WorkerFile`)."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr

from dsv4.protocol import contract
from dsv4.protocol.config import EngineStepConfig, KvHandoffConfig, ParallelismConfig, PrefixCacheConfig, WorkerFile
from dsv4.services.settings import RoleSettings

if TYPE_CHECKING:  # the settings load without torch; the engine's module needs it
    from dsv4.model_runtime.engine.llm_engine import EngineConfig


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(RoleSettings):
    """Everything a prefill or decode worker reads."""

    file_model = WorkerFile

    port: int = contract.WORKER_PORT
    device: str | None = None
    # The compute dtype; unset: bfloat16 on an accelerator (cuda, npu), float32 on a CPU (`compute_dtype`).
    # float64 exists for exactness checks on CPU: fp32 GEMMs round differently with the batch shape, which can flip
    # a near-tie greedy token of a random test model after a takeover re-batches a request.
    dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    pod_name: str = Field(default_factory=_default_consumer)  # the consumer name in the group
    pod_ip: str = "127.0.0.1"  # where the direct data plane is reached
    kv_handoff: KvHandoffConfig = KvHandoffConfig()
    parallelism: ParallelismConfig = ParallelismConfig()
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    prefix_tier_redis_password: SecretStr | None = None  # of prefix_cache.tier.redis_url
    engine: EngineStepConfig = EngineStepConfig()
    max_inflight: int | None = Field(
        default=None, ge=1, description="jobs this worker holds at once (default: its engine's max_num_seqs)"
    )
    reclaim_idle_ms: int = Field(default=15_000, ge=100, description="take over jobs untouched for this long")
    heartbeat_s: float = Field(default=2.0, gt=0, description="how often in-flight jobs are touched")
    drain_timeout_s: float = Field(default=60.0, ge=0, description="SIGTERM: how long in-flight jobs may finish")

    def engine_config(self) -> EngineConfig:
        """The engine's settings: batch limits, prefix cache, and the step switches (overlapped scheduling on means
        "where the device runs behind the host", the engine's default)."""
        from dsv4.model_runtime.engine.llm_engine import EngineConfig

        step = self.engine
        return EngineConfig(
            max_num_seqs=step.max_num_seqs,
            max_num_batched_tokens=step.max_num_batched_tokens,
            prefix_cache=self.prefix_cache.enabled,
            cuda_graphs=step.cuda_graphs,
            overlap_scheduling=None if step.overlap_scheduling else False,
            speculative_mtp=step.speculative_mtp,
        )

    def inflight_limit(self) -> int:
        """Jobs the worker holds at once: `max_inflight`, else as many as its engine batches (more would wait in
        the engine, leased, instead of in the queue where an idle worker could take them)."""
        return self.max_inflight if self.max_inflight is not None else self.engine.max_num_seqs

    def compute_dtype(self) -> str:
        """The model's compute dtype: `dtype` when set, else bfloat16 on cuda/npu and float32 on a CPU."""
        if self.dtype is not None:
            return self.dtype
        return "float32" if (self.device or "cpu").split(":")[0] == "cpu" else "bfloat16"
