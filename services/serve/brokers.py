"""The Redis the roles of `dsv4 serve` share, and how it is kept up.

Three kinds: the `--redis-url` one (someone else's: never restarted; the roles retry and the gateway's `/readyz`
answers 503 while it is away), a private `redis-server` on a free loopback port, or the in-process broker. The last
two are owned: `BrokerWatch` restarts one that died, on the same port so the roles' URLs stay valid. A restarted
broker is fresh and empty (persistence is off): requests in flight fail with a clean 503 and their clients retry;
the workers recreate their consumer groups at their next read. A broker that cannot be restarted, or that died
`MAX_RESTARTS` times within `RESTART_WINDOW_S`, stops `dsv4 serve` with one line and exit status 1.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dsv4.services.local_redis import LocalRedis, RedisServerError, redis_server_binary
from dsv4.services.serve.errors import ServeError
from dsv4.services.serve.preflight import check_redis, redact

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0


class Broker(Protocol):
    """What `dsv4 serve` needs of its Redis: LocalRedis and InProcessBroker have it, an external one trivially."""

    @property
    def url(self) -> str: ...

    def exited(self) -> int | None: ...

    def restart(self) -> Broker: ...

    def stop(self) -> None: ...


@dataclass
class ExternalRedis:
    """A Redis someone else runs (`--redis-url`): nothing to watch, restart or stop."""

    url: str

    def exited(self) -> int | None:
        return None

    def restart(self) -> ExternalRedis:
        return self

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class BrokerForRoles:
    """The Redis the roles share, how to describe it, and whether it is the in-process broker."""

    server: Broker
    description: str
    in_process: bool = False


def start_broker(choice: str, redis_url: str | None) -> BrokerForRoles:
    """The `--redis-url` Redis (checked), else the broker `choice` names: `auto` = a private `redis-server` when
    one is installed, else the in-process broker."""
    if redis_url:
        if choice != "auto":
            raise ServeError("--redis-url and --broker exclude each other")
        check_redis(redis_url)
        return BrokerForRoles(ExternalRedis(redis_url), f"Redis at {redact(redis_url)}")
    if choice == "redis-server" or (choice == "auto" and redis_server_binary() is not None):
        try:
            server = LocalRedis(bound_to_this_process=True).start()
        except RedisServerError as e:
            raise ServeError(f"cannot start redis-server: {e}".splitlines()[0]) from e
        return BrokerForRoles(server, f"redis-server on {server.host}:{server.port}")
    from dsv4.services.serve.in_process_broker import InProcessBroker  # fakeredis is imported only when it is used

    try:
        broker = InProcessBroker().start()
    except RedisServerError as e:
        raise ServeError(str(e)) from e
    why = " (no redis-server installed)" if choice == "auto" else ""
    return BrokerForRoles(broker, f"in-process broker on {broker.host}:{broker.port}{why}", in_process=True)


class BrokerWatch:
    """Restarts an owned broker that died; `check()` is called from the supervisor's loop."""

    def __init__(self, broker: BrokerForRoles, report: Callable[[str], None]) -> None:
        self.broker = broker
        self.report = report
        self.restarts: deque[float] = deque()

    def check(self) -> None:
        """Nothing while the broker runs; a restart once it died; ServeError when it cannot be kept up."""
        status = self.broker.server.exited()
        if status is None:
            return
        name, url = self.broker.description, self.broker.server.url
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            raise ServeError(
                f"the {name} died (status {status}) {len(self.restarts) + 1} times within {RESTART_WINDOW_S:.0f} s; "
                "stopping"
            )
        self.report(
            f"dsv4 serve: the {name} died (status {status}); restarting it empty at {url} "
            "(requests in flight get 503 and may be retried)"
        )
        try:
            self.broker.server.restart()
        except RedisServerError as e:
            raise ServeError(
                f"the {name} died (status {status}) and could not be restarted: {e}".splitlines()[0]
            ) from e
        self.restarts.append(now)
        self.report(f"dsv4 serve: the broker is back at {url} after {time.monotonic() - now:.2f} s")
