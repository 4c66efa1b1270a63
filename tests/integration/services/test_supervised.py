"""Processes bound to a supervisor (`dsv4.services.supervised`) exit when it dies, whatever killed it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv4.protocol import env

pytestmark = pytest.mark.integration

# A supervisor that starts one bound child (`sleep`, through the exec shim), prints its pid and waits.
SUPERVISOR = """
import subprocess, sys, time
from dsv4.services.supervised import supervised_env
child = subprocess.Popen([sys.executable, "-m", "dsv4.services.supervised", "sleep", "300"], env=supervised_env())
print(child.pid, flush=True)
time.sleep(300)
"""


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_bound_child_exits_when_its_supervisor_is_sigkilled() -> None:
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True)
    assert supervisor.stdout is not None
    child = int(supervisor.stdout.readline())
    try:
        time.sleep(1.0)  # the shim has exec'd sleep
        assert Path(f"/proc/{child}/comm").read_text().strip() == "sleep"
        assert not _gone(child, 0.5)
        supervisor.kill()
        supervisor.wait()
        assert _gone(child, 10), "the bound child outlived its SIGKILLed supervisor"
    finally:
        supervisor.kill()
        if not _gone(child, 0):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_supervisor_is_already_gone_stops_at_once() -> None:
    child_env = {**os.environ, env.SUPERVISOR_PID: "1"}  # not our parent: as if it died before we started
    done = subprocess.run(
        [sys.executable, "-m", "dsv4.services.supervised", "sleep", "300"], env=child_env, timeout=30, check=False
    )
    assert done.returncode == -signal.SIGTERM


def test_without_a_supervisor_nothing_is_bound() -> None:
    unsupervised = {k: v for k, v in os.environ.items() if k != env.SUPERVISOR_PID}
    done = subprocess.run([sys.executable, "-m", "dsv4.services.supervised", "true"], env=unsupervised, timeout=30)
    assert done.returncode == 0
