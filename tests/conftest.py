"""Fixtures shared by the whole suite: real servers on loopback, never mocks.

Imports of the servers' code happen inside the fixtures, so collecting a test that uses none of them (the kernel
tests on a bare GPU machine, say) needs nothing beyond the test's own imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dsv4.services.local_redis import LocalRedis


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """A fresh real `redis-server` on a free loopback port, persistence off; stopped after the test."""
    from dsv4.services.local_redis import LocalRedis

    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the test's own `redis-server`."""
    return redis_server.url
