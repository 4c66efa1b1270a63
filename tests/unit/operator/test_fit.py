"""The operator refuses a layout the model cannot fit, with `dsv4 plan`'s own verdict (the same function)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.plan import plan
from dsv4.model_runtime.presets import published_config
from dsv4.operator import checks

from .conftest import Admit

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.yaml"))


def _pro_on(admit: Admit, devices: int, pods: int) -> list[checks.Problem]:
    pool = {"parallelism": {"tensor": devices * pods}, "podsPerReplica": pods}
    spec = admit(
        {
            "model": {"variant": "pro", "source": {"hostPath": "/models/pro"}},
            "accelerator": {"type": "nvidia", "product": "H200", "devicesPerPod": devices},
            "prefill": pool,
            "decode": pool,
        }
    )
    return checks.spec_problems(spec)


def test_pro_on_four_h200s_is_refused_with_plans_shortfall(admit: Admit) -> None:
    problems = [p for p in _pro_on(admit, 4, 1) if p.reason == "DoesNotFit"]
    want = plan(ModelConfig.from_dict(published_config("pro")), "h200", 4, 1, 4, 1, False, model="DeepSeek-V4-Pro")
    assert not want.fits and "short by" in want.message
    assert [p.message for p in problems] == [f"prefill: {want.message}", f"decode: {want.message}"]


def test_pro_on_two_nodes_of_eight_h200s_fits(admit: Admit) -> None:
    assert not [p for p in _pro_on(admit, 8, 2) if p.reason == "DoesNotFit"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_fits(admit: Admit, example: Path) -> None:
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc.get("kind") == "DeepSeekV4Deployment":
            assert not [p for p in checks.spec_problems(admit(doc["spec"])) if p.reason == "DoesNotFit"], example


def test_custom_models_and_unlisted_devices_are_not_judged(admit: Admit) -> None:
    custom = admit({"model": {"variant": "custom", "source": {"hostPath": "/m"}}, "accelerator": {"type": "nvidia"}})
    a100 = admit(
        {
            "model": {"variant": "pro", "source": {"hostPath": "/m"}},
            "accelerator": {"type": "nvidia", "product": "A100", "devicesPerPod": 1},
        }
    )
    assert checks.fit_problems(custom) == [] and checks.fit_problems(a100) == []
