"""Every `DSV4_*` environment variable is named once, in `dsv4.protocol.env`, and each one named there is read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from dsv4.protocol import env
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.settings import RoleSettings
from dsv4.services.workers.settings import WorkerSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("kernels", "model_runtime", "protocol", "services", "operator")
DECLARED = {name: value for name, value in vars(env).items() if name.isupper() and value.startswith(env.PREFIX)}


def _settings_env_names(settings: type[RoleSettings]) -> set[str]:
    """DSV4_<FIELD> of every field, and DSV4_<FIELD>__<SUB> of the fields of nested models."""
    names = set()
    for field, info in settings.model_fields.items():
        names.add(f"{env.PREFIX}{field.upper()}")
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names.update(f"{env.PREFIX}{field.upper()}__{sub.upper()}" for sub in info.annotation.model_fields)
    return names


def _sources() -> dict[Path, str]:
    files = [f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")]
    return {f: f.read_text() for f in files if f != ROOT / "protocol" / "env.py"}


def test_every_settings_field_is_declared() -> None:
    declared = set(DECLARED.values())
    for settings in (GatewaySettings, WorkerSettings):
        top_level = {n for n in _settings_env_names(settings) if "__" not in n}
        assert top_level <= declared, f"{settings.__name__}: {sorted(top_level - declared)} not in dsv4.protocol.env"


def test_every_declared_name_is_read() -> None:
    read = _settings_env_names(GatewaySettings) | _settings_env_names(WorkerSettings)
    code = "\n".join(_sources().values())
    unread = [name for name, value in DECLARED.items() if value not in read and f"env.{name}" not in code]
    assert not unread, f"declared in dsv4.protocol.env but never read: {unread}"


def test_no_module_spells_a_dsv4_variable_itself() -> None:
    literal = re.compile(r"""["']DSV4_[A-Z_]+""")
    offenders = [
        f"{f.relative_to(ROOT)}: {m.group()}" for f, text in _sources().items() for m in literal.finditer(text)
    ]
    assert not offenders, offenders
