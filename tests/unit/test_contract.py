"""The operator/services container contract."""

from __future__ import annotations

import pytest

from dsv4.services import cli, contract

pytestmark = pytest.mark.unit


def test_every_role_is_a_cli_subcommand() -> None:
    assert {r.value for r in contract.Role} <= set(cli.COMMANDS)


def test_redis_keys_are_namespaced_per_deployment() -> None:
    a = contract.stream_key("prod", contract.PREFILL_STREAM)
    b = contract.stream_key("staging", contract.PREFILL_STREAM)
    assert a == "dsv4:{prod}:stream:prefill" and a != b


@pytest.mark.parametrize("bad", ["", "a:b", "x{y", "z}"])
def test_bad_deployment_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid deployment name"):
        contract.redis_key(bad, "x")
