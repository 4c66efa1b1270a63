"""The role's settings file from the operator's ConfigMap (`DSV4_CONFIG_FILE`) as a pydantic-settings source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from dsv4.protocol import env
from dsv4.protocol.config import WireModel


class ConfigFileError(ValueError):
    """The mounted settings file is unreadable or does not match its role's model; the message names the file."""


def read_role_config(model: type[WireModel]) -> dict[str, Any]:
    """The fields set in the file at `$DSV4_CONFIG_FILE`, validated by `model` (snake_case names, nested as dicts);
    {} when the variable is unset or the file is absent."""
    path = os.environ.get(env.CONFIG_FILE)
    if not path or not Path(path).is_file():
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return model.model_validate(data).model_dump(exclude_unset=True)
    except (yaml.YAMLError, ValidationError) as e:
        raise ConfigFileError(f"{path}: not a valid {model.__name__} settings file: {e}") from e


class ConfigFileSource(PydanticBaseSettingsSource):
    """Feeds the role's settings file into a settings class, below init arguments and the environment."""

    def __init__(self, settings_cls: type[BaseSettings], model: type[WireModel]) -> None:
        super().__init__(settings_cls)
        self._model = model

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return read_role_config(self._model)
