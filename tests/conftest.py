"""Fixtures shared by the whole suite: real servers on loopback, never mocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dsv4.services.local_redis import LocalRedis


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """A fresh real `redis-server` on a free loopback port, persistence off; stopped after the test."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the test's own `redis-server`."""
    return redis_server.url
