"""Worker groups: the group's size from WORLD_SIZE and the parallelism settings (a mismatch is a one-line usage
error, exit 2), and the probes a follower answers for its pod."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dsv4.protocol import config, contract, env
from dsv4.services.workers.group import GroupConfigError, follower_app, group_world
from dsv4.services.workers.settings import WorkerSettings

pytestmark = pytest.mark.unit


def _settings(tensor: int = 1, data: int = 1, expert: bool = False) -> WorkerSettings:
    return WorkerSettings(parallelism=config.ParallelismConfig(tensor=tensor, data=data, expert=expert))


def test_world_is_the_parallelism_when_no_rank_env_is_set() -> None:
    assert group_world(_settings(), {}) == 1
    assert group_world(_settings(tensor=4), {}) == 4
    assert group_world(_settings(tensor=2), {env.WORLD_SIZE: "2"}) == 2


def test_pure_data_parallel_with_one_rank_per_pod_serves_each_pod_alone() -> None:
    # A cpu pool of 2 pods: the operator writes tensor 1 x data 2 and the 2-rank group env.
    assert group_world(_settings(data=2), {env.WORLD_SIZE: "2", env.NPROC_PER_NODE: "1"}) == 1
    # Both ranks in one pod, or experts split over the pods: one group of data-parallel attention.
    assert group_world(_settings(data=2), {env.WORLD_SIZE: "2", env.NPROC_PER_NODE: "2"}) == 2
    assert group_world(_settings(data=2, expert=True), {env.WORLD_SIZE: "2", env.NPROC_PER_NODE: "1"}) == 2


def test_data_parallel_attention_runs_as_one_group() -> None:
    # The Ascend example's layout, TP16 x DP2 over 2 pods of 16 dies: one group of 32 ranks.
    assert group_world(_settings(tensor=16, data=2), {env.WORLD_SIZE: "32", env.NPROC_PER_NODE: "16"}) == 32


@pytest.mark.parametrize(
    ("settings", "environ", "message"),
    [
        (_settings(tensor=2), {env.WORLD_SIZE: "4"}, "WORLD_SIZE=4, but the parallelism settings give tensor x data"),
        (_settings(), {env.WORLD_SIZE: "2"}, "= 1 ranks"),
        (_settings(tensor=2), {env.WORLD_SIZE: "two"}, "not an integer"),
    ],
)
def test_groups_that_disagree_with_their_settings_are_refused(
    settings: WorkerSettings, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(GroupConfigError, match=message):
        group_world(settings, environ)


def test_a_mismatched_group_exits_2_with_one_line(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(env.PREFIX)}
    environ |= {env.WORLD_SIZE: "3", f"{env.PARALLELISM}__TENSOR": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "dsv4.services.cli", "decode", "--model", str(tmp_path)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("dsv4 decode: WORLD_SIZE=3, but the parallelism settings give tensor x data = 2 x 1")


def test_a_follower_is_ready_once_its_shard_is_loaded() -> None:
    ready = threading.Event()
    client = TestClient(follower_app(3, ready))
    assert client.get(contract.HEALTH_PATH).status_code == 200
    starting = client.get(contract.READY_PATH)
    assert (starting.status_code, starting.json()) == (503, {"status": "starting", "rank": 3})
    ready.set()
    assert client.get(contract.READY_PATH).status_code == 200
