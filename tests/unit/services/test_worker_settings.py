"""The worker's compute dtype: bf16 on accelerators, fp32 on a CPU, unless DSV4_DTYPE or the settings say."""

from __future__ import annotations

import pytest

from dsv4.protocol import env
from dsv4.services.workers.settings import WorkerSettings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("device", "want"),
    [(None, "float32"), ("cpu", "float32"), ("cuda", "bfloat16"), ("cuda:3", "bfloat16"), ("npu:0", "bfloat16")],
)
def test_default_dtype_follows_the_device(monkeypatch: pytest.MonkeyPatch, device: str | None, want: str) -> None:
    monkeypatch.delenv(env.DTYPE, raising=False)
    monkeypatch.delenv(env.DEVICE, raising=False)
    assert WorkerSettings(device=device).compute_dtype() == want


def test_an_explicit_dtype_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.DTYPE, "float32")
    assert WorkerSettings(device="cuda").compute_dtype() == "float32"
    monkeypatch.delenv(env.DTYPE)
    assert WorkerSettings(device="cpu", dtype="float64").compute_dtype() == "float64"
