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


def test_the_batch_limits_reach_the_engine_and_bound_the_jobs_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's batch (`engine.maxNumSeqs` in the CR, `--max-num-seqs`) is also how many jobs a worker holds,
    unless `max_inflight` says otherwise; the token budget of a step reaches the engine."""
    for name in (f"{env.ENGINE}__MAX_NUM_SEQS", f"{env.ENGINE}__MAX_NUM_BATCHED_TOKENS", env.MAX_INFLIGHT):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(env.CONFIG_FILE, raising=False)
    default = WorkerSettings()
    assert (default.engine_config().max_num_seqs, default.engine_config().max_num_batched_tokens) == (32, 512)
    assert default.inflight_limit() == 32
    monkeypatch.setenv(f"{env.ENGINE}__MAX_NUM_SEQS", "128")
    monkeypatch.setenv(f"{env.ENGINE}__MAX_NUM_BATCHED_TOKENS", "8192")
    wide = WorkerSettings()
    assert (wide.engine_config().max_num_seqs, wide.engine_config().max_num_batched_tokens) == (128, 8192)
    assert wide.inflight_limit() == 128
    monkeypatch.setenv(env.MAX_INFLIGHT, "8")
    assert WorkerSettings().inflight_limit() == 8
