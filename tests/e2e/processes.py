"""Real `dsv4` role processes on loopback for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from dsv4.protocol import contract
from dsv4.services.local_redis import free_port


class RoleProcess:
    """`dsv4 <role>` in a subprocess with its HTTP side on a free port; ready when /readyz answers 200."""

    def __init__(self, role: str, args: list[str], env: Mapping[str, str]) -> None:
        self.role = role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix=f"dsv4-{role}-")) / "log"
        self.args = [sys.executable, "-m", "dsv4.services.cli", role, *args]
        if role == contract.Role.GATEWAY.value:
            self.args += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**os.environ, **env, "DSV4_PORT": str(self.port), "DSV4_POD_NAME": f"{role}-{self.port}"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RoleProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120) -> RoleProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + contract.READY_PATH, timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.role} not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: a crash, no drain."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RoleGroup:
    """Several role processes started together (all first, then waiting for each) and stopped together."""

    def all(self) -> Sequence[RoleProcess]:
        raise NotImplementedError

    def start(self) -> RoleGroup:
        for p in self.all():
            p.start()
        for p in self.all():
            p.wait_ready()
        return self

    def stop(self) -> None:
        for p in self.all():
            p.stop(timeout=10)
