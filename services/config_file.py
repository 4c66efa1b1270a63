"""The role's settings file from the operator's ConfigMap (`DSV4_CONFIG_FILE`) as a pydantic-settings source."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from dsv4.services import contract


def read_role_config() -> dict[str, Any]:
    """The YAML mapping at `$DSV4_CONFIG_FILE`, or {} when the variable is unset or the file absent."""
    path = os.environ.get(contract.ENV_CONFIG_FILE)
    if not path or not Path(path).is_file():
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


class ConfigFileSource(PydanticBaseSettingsSource):
    """Feeds `to_fields(read_role_config())` into a settings class, below init arguments and the environment."""

    def __init__(self, settings_cls: type[BaseSettings], to_fields: Callable[[dict[str, Any]], dict[str, Any]]):
        super().__init__(settings_cls)
        self._to_fields = to_fields

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._to_fields(read_role_config())
