"""Start and stop a private `redis-server` on loopback: used by `dsv4 serve` and by the test fixtures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dsv4.services.supervised import supervised_env


class RedisServerError(RuntimeError):
    """redis-server is missing, did not start, or died."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_binary() -> str | None:
    """Path of `redis-server` on PATH (or in /usr/sbin, where Debian may put it), else None."""
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")


class LocalRedis:
    """A `redis-server` child process on a free loopback port with persistence off.

    Use as a context manager; `url` is valid once `start()` returned. The log is kept in the temporary directory and
    its tail is part of every error.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
        *,
        bound_to_this_process: bool = False,
    ) -> None:
        """`bound_to_this_process`: the server exits when this process does, even when it is SIGKILLed (Linux)."""
        self.host = host
        self.bound = bound_to_this_process
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="dsv4-redis-"))

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it was started by this object."""
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log, for error messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> LocalRedis:
        binary = redis_server_binary()
        if binary is None:
            raise RedisServerError("redis-server is not installed (Debian: apt-get install redis-server)")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_path),
            "--protected-mode", "yes",
        ]  # fmt: skip
        # Its own process group: a terminal's Ctrl-C reaches only the owner, which stops Redis after its clients.
        env = None
        if self.bound:
            args = [sys.executable, "-m", "dsv4.services.supervised", *args]
            env = supervised_env()
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0, env=env
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RedisServerError(f"redis-server exited with {self._proc.returncode}: {err}{self.log_tail()}")
            if self._answers_as_ours():
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on {self.url} within {self.startup_timeout}s")

    def _answers_as_ours(self) -> bool:
        # Compare the pid: on a port already taken, another server answers while our child is still exiting.
        assert self._proc is not None
        try:
            # No retries: something else listening on the port may never answer, and each retry waits it out again.
            no_retry = Retry(NoBackoff(), 0)
            with redis.Redis(
                host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.2, retry=no_retry
            ) as c:
                return int(c.info("server")["process_id"]) == self._proc.pid
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def exited(self) -> int | None:
        """The server's exit status once it died (killed, crashed), else None; None also before `start()`."""
        return None if self._proc is None else self._proc.poll()

    def restart(self) -> LocalRedis:
        """Start a fresh, empty server on the same port after this one died (the clients' URL stays valid)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                raise RedisServerError(f"redis-server on {self.url} is still running; stop it before a restart")
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server without cleaning up, to simulate a crash; `start()` brings it back on the same port."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
