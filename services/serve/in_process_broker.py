"""An in-process, Redis-compatible broker for `dsv4 serve` on a machine without `redis-server`.

It is fakeredis's TCP server (streams, consumer groups, XAUTOCLAIM, XCLAIM JUSTID, XINFO, SET with PXAT/EX, MULTI)
on a free loopback port, served by threads of the process that owns it. The roles reach it with an ordinary
`redis://` URL through `protocol.connection.connect`, exactly as they reach a real Redis, so nothing in the serving
path knows the difference. It has the same interface as `LocalRedis` (`start`, `stop`, `exited`, `restart`, `url`,
context manager).

Limits, which is why `dsv4 serve` prefers a real `redis-server`: it parses large values slowly (a 4 MiB SET takes
seconds), so `dsv4 serve` moves KV state over the `direct` data plane on it and Redis carries only descriptors;
expired keys are dropped when next touched rather than in the background; and it lives and dies with its process.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import redis
from fakeredis import TcpFakeServer

from dsv4.services.local_redis import RedisServerError, free_port


class InProcessBroker:
    """fakeredis's TCP server on `host`:`port` (a free port by default), run by a background thread."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 5.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self._server: TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> InProcessBroker:
        try:
            self._server = TcpFakeServer((self.host, self.port))
        except OSError as e:
            raise RedisServerError(f"in-process broker cannot listen on {self.host}:{self.port}: {e}") from e
        self._thread = threading.Thread(target=self._server.serve_forever, name="dsv4-broker", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.2) as c:
                    if c.ping():
                        return self
            except (redis.RedisError, OSError):
                time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"in-process broker did not answer on {self.url} within {self.startup_timeout}s")

    def exited(self) -> int | None:
        """1 once the serving thread ended without `stop()` (a bug in the server), else None."""
        if self._server is None or self._thread is None:
            return None
        return None if self._thread.is_alive() else 1

    def restart(self) -> InProcessBroker:
        """A fresh, empty server on the same port."""
        self.stop()
        return self.start()

    def stop(self) -> None:
        """Stop serving and close every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # ends serve_forever and tells every connection thread to finish
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> InProcessBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
