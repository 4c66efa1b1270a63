"""The one place that builds Redis clients (services and operator) and turns "Redis is gone" into one typed error.

Every client has short connect and socket timeouts and a bounded retry, so an unreachable or frozen Redis becomes
`RedisUnavailable` within seconds; nothing in the serving path may hang on Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

# Blocking reads (XREAD BLOCK) must stay well under SOCKET_TIMEOUT_S, or the socket times out first.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
MAX_BLOCK_MS = 1000


class RedisUnavailable(RuntimeError):
    """Redis could not be reached or did not answer in time; the caller answers 503 or retries later."""


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)


def connect(
    url: str,
    password: str | None = None,
    *,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    max_connections: int | None = None,
) -> aioredis.Redis:
    """An asyncio Redis client for `url` with the services' timeouts and retry policy (connects lazily).
    `max_connections`: its pool's limit (redis-py's default, 100, when None); past it a command fails with
    "Too many connections" (`RedisUnavailable` under `unavailable_as_typed`)."""
    return aioredis.Redis.from_url(
        url,
        password=password or None,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        health_check_interval=30,
    )


@contextmanager
def unavailable_as_typed(what: str) -> Iterator[None]:
    """Re-raise connection-level Redis failures inside the block as `RedisUnavailable` naming `what` failed."""
    try:
        yield
    except UNAVAILABLE_ERRORS as e:
        raise RedisUnavailable(f"Redis unavailable while {what}: {e}") from e
