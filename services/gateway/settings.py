"""Gateway settings (`RoleSettings` sources: flags, `DSV4_*` environment, the mounted `GatewayFile`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from dsv4.protocol import contract
from dsv4.protocol.config import MODEL_CONTEXT, DisaggregationConfig, GatewayFile, PrefixRoutingConfig
from dsv4.services.settings import RoleSettings

DEFAULT_SERVED_MODEL_NAME = "deepseek-v4-flash"


class GatewaySettings(RoleSettings):
    """Everything the gateway reads. `model` is the checkpoint folder whose tokenizer.json it uses (else the bundled
    official tokenizer); the gateway never loads weights."""

    file_model = GatewayFile

    port: int = contract.GATEWAY_PORT
    api_key_file: Path | None = None
    api_keys: SecretStr | None = None  # comma-separated
    served_model_name: str = DEFAULT_SERVED_MODEL_NAME
    disaggregation: DisaggregationConfig = DisaggregationConfig()
    prefix_routing: PrefixRoutingConfig = PrefixRoutingConfig()
    max_model_len: int = Field(
        default=MODEL_CONTEXT, ge=16, description="prompt + max_tokens a request may ask for (400 beyond)"
    )
    default_max_tokens: int = Field(default=1024, ge=1)
    token_timeout_s: float = Field(default=600.0, gt=0, description="504 when no token arrives for this long")
    queue_stats_ttl_s: float = Field(default=0.5, ge=0, description="how long one read of the queue depth is reused")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of 503 answers")
    redis_max_connections: int = Field(
        default=contract.GATEWAY_REDIS_CONNECTIONS,
        ge=8,
        description="Redis connections of this gateway: every choice in flight holds one while it waits for its "
        "tokens, so this bounds the choices in flight (past it requests get 503 with Retry-After); keep the sum "
        "over gateway replicas under the Redis server's maxclients (the managed Redis admits maxReplicas times the "
        "default)",
    )

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
