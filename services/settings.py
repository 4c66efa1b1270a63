"""What every role's settings share: where they come from and the fields common to the gateway and the workers.

Sources, highest first: init arguments (command-line flags), `DSV4_<FIELD>` environment variables (nested fields with
`__`, every name declared in `dsv4.protocol.env`), then the settings file the operator mounts from the role's
ConfigMap (`dsv4.protocol.config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dsv4.protocol import env
from dsv4.protocol.config import WireModel
from dsv4.services.config_file import ConfigFileSource


class RoleSettings(BaseSettings):
    """The base of `GatewaySettings` and `WorkerSettings`."""

    model_config = SettingsConfigDict(env_prefix=env.PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True)
    file_model: ClassVar[type[WireModel]]  # the role's settings file

    deployment: str = "default"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = None
    model: Path | None = None  # checkpoint folder
    host: str = "0.0.0.0"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls, cls.file_model)

    def redis_password_value(self) -> str | None:
        """The Redis password in clear, for the client."""
        return self.redis_password.get_secret_value() if self.redis_password else None
