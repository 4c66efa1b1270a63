"""The rank launcher: torchrun env for every rank, a gloo group on CPU, and all-or-nothing when a rank dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4.model_runtime.parallel.launch import GroupEnv, LaunchError

pytestmark = pytest.mark.unit
TARGETS = Path(__file__).with_name("rank_targets.py")


def _launch(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", "--grace", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_rank_gets_the_torchrun_env_and_joins_a_gloo_group(tmp_path: Path, group_env) -> None:
    done = _launch(group_env(), "--nproc-per-node", "3", "--device", "cpu", f"{TARGETS}:report", str(tmp_path))
    assert done.returncode == 0, done.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for r, s in enumerate(seen):
        assert (s["rank"], s["local_rank"], s["world"]) == (r, r, 3)
        assert s["backend"] == "gloo" and s["device"] == "cpu"
        assert s["sum"] == 0 + 1 + 2  # the all-reduce crossed the three processes
        assert s["env"]["RANK"] == str(r) and s["env"]["LOCAL_WORLD_SIZE"] == "3" and s["env"]["WORLD_SIZE"] == "3"


def test_ranks_of_the_second_pod_of_a_group(tmp_path: Path, free_port) -> None:
    """Two pods of 2 ranks each, both on this host: node rank 1 starts ranks 2 and 3."""
    port = str(free_port())
    pods = [
        subprocess.Popen(
            [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", f"{TARGETS}:report", str(tmp_path)],
            env=os.environ
            | {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "WORLD_SIZE": "4",
                "NODE_RANK": str(node),
                "NPROC_PER_NODE": "2",
                "OMP_NUM_THREADS": "1",
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], errors
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)}
    assert [seen[r]["local_rank"] for r in range(4)] == [0, 1, 0, 1]
    assert all(s["sum"] == 6 and s["world"] == 4 for s in seen.values())


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_rank_that_dies_ends_the_whole_group(tmp_path: Path, how: str, group_env) -> None:
    start = time.monotonic()
    done = _launch(group_env(), "--nproc-per-node", "3", f"{TARGETS}:fail_one", str(tmp_path), "1", how)
    assert done.returncode != 0
    ended = "exited with status 3" if how == "exit" else "was killed by SIGKILL"
    assert f"rank 1 (local rank 1, pid {(tmp_path / 'pid1').read_text()}) {ended}; stopping the group" in done.stderr
    for r in (0, 2):  # the survivors were blocked in a barrier; the launcher stopped them
        pid = int((tmp_path / f"pid{r}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert time.monotonic() - start < 60  # not the collective's timeout


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path: Path, group_env) -> None:
    env = group_env()
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv4.model_runtime.parallel.launch",
            "--nproc-per-node",
            "2",
            "--grace",
            "2",
            f"{TARGETS}:fail_one",
            str(tmp_path),
            "-1",
            "exit",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"pid{r}").exists() for r in range(2)) and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    for r in range(2):
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid{r}").read_text()), 0)


def test_group_env_errors_name_the_variable() -> None:
    with pytest.raises(LaunchError, match="NODE_RANK=2 with NPROC_PER_NODE=4 needs ranks up to 11, but WORLD_SIZE=8"):
        GroupEnv.from_env({"WORLD_SIZE": "8", "NODE_RANK": "2", "NPROC_PER_NODE": "4"})
    with pytest.raises(LaunchError, match="MASTER_PORT='x': not an integer"):
        GroupEnv.from_env({"MASTER_PORT": "x"})
    g = GroupEnv.from_env(
        {"MASTER_ADDR": "leader.group-0", "WORLD_SIZE": "16", "NODE_RANK": "1", "NPROC_PER_NODE": "8"}
    )
    assert g.rank_env(3)["RANK"] == "11" and g.rank_env(3)["MASTER_ADDR"] == "leader.group-0"
