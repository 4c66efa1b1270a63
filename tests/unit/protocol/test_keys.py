"""Redis key names: one namespace per deployment, refused deployment names, handoff ids inside descriptor keys."""

from __future__ import annotations

import pytest

from dsv4.protocol import contract, keys
from dsv4.services import cli

pytestmark = pytest.mark.unit


def test_every_role_is_a_cli_subcommand() -> None:
    assert {r.value for r in contract.Role} <= set(cli.COMMANDS)


def test_redis_keys_are_namespaced_per_deployment() -> None:
    a = keys.stream_key("prod", keys.PREFILL_STREAM)
    b = keys.stream_key("staging", keys.PREFILL_STREAM)
    assert a == "dsv4:{prod}:stream:prefill" and a != b


@pytest.mark.parametrize("bad", ["", "a:b", "x{y", "z}"])
def test_bad_deployment_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid deployment name"):
        keys.redis_key(bad, "x")


def test_a_descriptor_key_gives_back_its_handoff_id() -> None:
    assert keys.handoff_id_of(keys.descriptor_key("prod", "h1")) == "h1"
    assert keys.handoff_id_of(keys.chunk_key("prod", "h1", 0)) is None
    assert keys.handoff_id_of("not:a:key") is None
