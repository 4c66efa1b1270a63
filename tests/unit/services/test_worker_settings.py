"""The worker's compute dtype (bf16 on accelerators, fp32 on a CPU, unless DSV4_DTYPE or the settings say) and
the engine settings it builds from its own."""

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


def test_the_engine_config_follows_the_step_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults leave overlapped scheduling to the device (None: on where it runs behind the host), graphs on and
    MTP off; `DSV4_ENGINE__*` (from the pool's `engine` in the CR) switches each, and the prefix cache follows its
    own."""
    mtp = f"{env.ENGINE}__SPECULATIVE_MTP"
    for name in (
        f"{env.ENGINE}__CUDA_GRAPHS",
        f"{env.ENGINE}__OVERLAP_SCHEDULING",
        f"{env.PREFIX_CACHE}__ENABLED",
        mtp,
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(env.CONFIG_FILE, raising=False)
    default = WorkerSettings().engine_config()
    assert (default.cuda_graphs, default.overlap_scheduling, default.prefix_cache) == (True, None, True)
    assert not default.speculative_mtp
    monkeypatch.setenv(f"{env.ENGINE}__OVERLAP_SCHEDULING", "false")
    monkeypatch.setenv(f"{env.ENGINE}__CUDA_GRAPHS", "false")
    monkeypatch.setenv(f"{env.PREFIX_CACHE}__ENABLED", "false")
    monkeypatch.setenv(mtp, "true")
    off = WorkerSettings().engine_config()
    assert (off.cuda_graphs, off.overlap_scheduling, off.prefix_cache) == (False, False, False)
    assert off.speculative_mtp
