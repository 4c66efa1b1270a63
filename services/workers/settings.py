"""Worker settings: init arguments, then `DSV4_*` environment variables, then the mounted config file."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dsv4.services import contract
from dsv4.services.config_file import ConfigFileSource
from dsv4.services.handoff import DEFAULT_TTL_S, MAX_CHUNK_BYTES


class KvHandoffSettings(BaseModel):
    """The operator's `spec.kvHandoff` (same field names)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    transport: Literal["redis", "direct"] = "redis"
    ttl_seconds: int = Field(default=DEFAULT_TTL_S, ge=1)
    chunk_bytes: int = Field(default=MAX_CHUNK_BYTES, ge=4096, le=MAX_CHUNK_BYTES)


def _from_config_file(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "deployment" in data:
        out["deployment"] = data["deployment"]
    if "kvHandoff" in data:
        out["kv_handoff"] = data["kvHandoff"]
    return out


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Everything a prefill or decode worker reads (`DSV4_<FIELD>`; contract.py names the shared ones)."""

    model_config = SettingsConfigDict(env_prefix="DSV4_", env_nested_delimiter="__", extra="ignore", frozen=True)

    deployment: str = "default"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    model: Path | None = None
    device: str | None = None
    # float64 exists for exactness checks on CPU: fp32 GEMMs round differently with the batch shape, which can flip
    # a near-tie greedy token of a random test model after a takeover re-batches a request.
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    pod_name: str = Field(default_factory=_default_consumer)  # the consumer name in the group
    pod_ip: str = "127.0.0.1"  # where the direct data plane is reached
    host: str = "0.0.0.0"
    port: int = contract.WORKER_PORT
    kv_handoff: KvHandoffSettings = KvHandoffSettings()
    max_inflight: int = Field(default=16, ge=1, description="jobs this worker runs at once")
    reclaim_idle_ms: int = Field(default=15_000, ge=100, description="take over jobs untouched for this long")
    heartbeat_s: float = Field(default=2.0, gt=0, description="how often in-flight jobs are touched")
    drain_timeout_s: float = Field(default=60.0, ge=0, description="SIGTERM: how long in-flight jobs may finish")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls, _from_config_file)
