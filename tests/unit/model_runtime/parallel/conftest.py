"""Fixtures of the multi-rank tests: a free rendezvous port, and sharded model runs through the real launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

MODEL_RANK = f"{Path(__file__).with_name('model_rank.py')}:main"
ENGINE_RANK = f"{Path(__file__).with_name('engine_rank.py')}:main"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """free_port() -> a free loopback port for a group's MASTER_PORT."""
    return _free_port


def launcher_env() -> dict[str, str]:
    """This process's environment minus any group variables and backend override, one CPU thread per rank."""
    drop = ("DSV4_KERNEL_BACKEND", "WORLD_SIZE", "NODE_RANK", "NPROC_PER_NODE", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }


def _launch(target: str, args: list[str], out: Path, world: int, timeout: float) -> None:
    """Start `world` ranks of `target` through the launcher with `args` and the output folder `out` last; they must
    all succeed."""
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", "--nproc-per-node", str(world), target]
    done = subprocess.run([*cmd, *args, str(out)], env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def run_model_ranks(ckpt: Path, layout: str, ids: Path, out: Path, world: int, timeout: float = 900) -> list[Any]:
    """Start `world` ranks through the launcher, each running model_rank.py on `ckpt` under layout "tp,ep";
    returns what each rank saved."""
    _launch(MODEL_RANK, [str(ckpt), layout, str(ids)], out, world, timeout)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def run_engine_ranks(ckpt: Path, layout: str, work: Path, out: Path, world: int, timeout: float = 900) -> Any:
    """Start `world` ranks through the launcher, each running engine_rank.py on `ckpt` under layout "tp" or
    "tp,ep" with the work of `work`; returns what the leader saved."""
    _launch(ENGINE_RANK, [str(ckpt), layout, str(work)], out, world, timeout)
    return torch.load(out / "result.pt")


@pytest.fixture
def group_env() -> Callable[[], dict[str, str]]:
    """group_env() -> an environment for one launcher run (fresh MASTER_PORT)."""
    return launcher_env


@pytest.fixture(scope="session")
def model_ranks() -> Callable[..., list[Any]]:
    """model_ranks(ckpt, "tp,ep", ids_file, out_dir, world) -> the ranks' results (see model_rank.py)."""
    return run_model_ranks
