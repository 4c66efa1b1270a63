"""Invalid specs are refused with the message a user needs; valid ones are admitted with defaults filled in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Admit, Rejected

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
INVALID: list[dict[str, Any]] = yaml.safe_load((HERE / "invalid_specs.yaml").read_text())
EXAMPLES = sorted((HERE.parents[2] / "examples").glob("*.yaml"))


def test_at_least_fifteen_invalid_specs() -> None:
    assert len(INVALID) >= 15 and len({c["id"] for c in INVALID}) == len(INVALID)


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_invalid_spec_is_rejected_with_a_clear_message(admit: Admit, case: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as err:
        admit(case["spec"], name=case.get("name", "demo"))
    assert case["message"] in str(err.value)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_admitted(admit: Admit, path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "DeepSeekV4Deployment":
            admit(doc["spec"], name=doc["metadata"]["name"])


def test_minimal_spec_is_admitted_with_defaults(admit: Admit) -> None:
    spec = admit({"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}})
    assert spec.redis.managed and spec.kv_handoff.chunk_bytes == 4 * 1024 * 1024
    assert (spec.prefill.replicas, spec.decode.replicas, spec.gateway.replicas) == (1, 1, 1)


def test_prefill_may_be_zero_without_disaggregation(admit: Admit) -> None:
    spec = admit(
        {
            "model": {"variant": "tiny"},
            "accelerator": {"type": "cpu"},
            "disaggregation": {"mode": "never"},
            "prefill": {"replicas": 0, "minReplicas": 0, "maxReplicas": 0},
        }
    )
    assert spec.prefill.replicas == 0


def test_external_redis_with_password_is_admitted(admit: Admit) -> None:
    spec = admit(
        {
            "model": {"variant": "tiny"},
            "accelerator": {"type": "cpu"},
            "redis": {"managed": False, "url": "rediss://r.example:6380/0", "secretRef": {"name": "redis-auth"}},
        }
    )
    assert spec.redis.secret_ref is not None and spec.redis.secret_ref.key == "password"
