"""Gateway settings: init arguments, then `DSV4_*` environment variables, then the mounted config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dsv4.services.config_file import ConfigFileSource


class DisaggregationSettings(BaseModel):
    """When a request goes through the prefill pool (the operator's `spec.disaggregation`, same field names)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    mode: Literal["auto", "always", "never"] = "auto"
    min_prompt_tokens: int = Field(default=512, ge=0)
    max_prefill_queue: int = Field(default=64, ge=0)


def _from_config_file(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "deployment" in data:
        out["deployment"] = data["deployment"]
    if "disaggregation" in data:
        out["disaggregation"] = data["disaggregation"]
    variant = (data.get("model") or {}).get("variant")
    if variant:
        out["served_model_name"] = f"deepseek-v4-{variant}"
    return out


class GatewaySettings(BaseSettings):
    """Everything the gateway reads. Environment names are `DSV4_<FIELD>` (contract.py lists the shared ones)."""

    model_config = SettingsConfigDict(env_prefix="DSV4_", env_nested_delimiter="__", extra="ignore", frozen=True)

    deployment: str = "default"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    api_key_file: Path | None = None
    api_keys: SecretStr | None = None  # comma-separated
    model: Path | None = None  # checkpoint folder; its tokenizer.json, else the bundled official tokenizer
    served_model_name: str = "deepseek-v4-flash"
    disaggregation: DisaggregationSettings = DisaggregationSettings()
    max_model_len: int = Field(default=65536, ge=16)
    default_max_tokens: int = Field(default=1024, ge=1)
    token_timeout_s: float = Field(default=600.0, gt=0, description="504 when no token arrives for this long")
    queue_stats_ttl_s: float = Field(default=0.5, ge=0, description="how long one read of the queue depth is reused")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of 503 answers")

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

    def accepted_api_keys(self) -> frozenset[str]:
        """Keys from the key file (one per line; blank lines and `#` comments skipped) and `DSV4_API_KEYS`.

        Read on every call, so a rotated Secret takes effect without a restart. Empty = no auth.
        """
        keys: set[str] = set()
        if self.api_keys:
            keys.update(k.strip() for k in self.api_keys.get_secret_value().split(","))
        if self.api_key_file is not None:
            for line in self.api_key_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        keys.discard("")
        return frozenset(keys)
