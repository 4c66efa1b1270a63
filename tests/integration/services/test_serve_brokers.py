"""`dsv4 serve` keeps the private broker it owns up: a redis-server that died comes back empty on the same port, and
one that cannot be kept up stops serve with one clear line."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import redis

from dsv4.services.local_redis import LocalRedis
from dsv4.services.serve.brokers import MAX_RESTARTS, BrokerForRoles, BrokerWatch
from dsv4.services.serve.errors import ServeError
from dsv4.services.serve.in_process_broker import InProcessBroker

pytestmark = pytest.mark.integration


@pytest.fixture
def owned() -> Iterator[LocalRedis]:
    server = LocalRedis().start()
    yield server
    server.stop()


def crash(server: LocalRedis) -> None:
    """SIGKILL the server behind its owner's back, as `kill -9` or the OOM killer would, and wait until it is gone."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.exited() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.exited() == -signal.SIGKILL


def watch(server: LocalRedis, lines: list[str]) -> BrokerWatch:
    return BrokerWatch(BrokerForRoles(server, f"redis-server on {server.host}:{server.port}"), lines.append)


def test_a_killed_broker_comes_back_empty_on_the_same_url(owned: LocalRedis) -> None:
    lines: list[str] = []
    w = watch(owned, lines)
    client = redis.Redis.from_url(owned.url)
    client.set("k", "v")
    w.check()
    assert lines == []  # alive: nothing to do
    crash(owned)
    w.check()
    assert client.ping() and client.get("k") is None  # same URL, fresh and empty
    assert "died" in lines[0] and owned.url in lines[0] and "back" in lines[1]


def test_a_broker_that_cannot_be_restarted_stops_serve(owned: LocalRedis) -> None:
    w = watch(owned, [])
    crash(owned)
    with socket.socket() as squatter:  # someone took the port meanwhile: the restart cannot listen on it
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((owned.host, owned.port))
        squatter.listen()
        with pytest.raises(ServeError) as e:
            w.check()
    assert "could not be restarted" in str(e.value) and "\n" not in str(e.value)


def test_a_broker_that_keeps_dying_stops_serve(owned: LocalRedis) -> None:
    w = watch(owned, [])
    for _ in range(MAX_RESTARTS):
        crash(owned)
        w.check()
    crash(owned)
    with pytest.raises(ServeError) as e:
        w.check()
    assert f"{MAX_RESTARTS + 1} times within" in str(e.value)


def test_the_in_process_broker_restarts_empty_on_the_same_url() -> None:
    broker = InProcessBroker().start()
    try:
        client = redis.Redis.from_url(broker.url)
        client.set("k", "v")
        assert broker.exited() is None
        broker.restart()
        assert broker.exited() is None and client.get("k") is None and client.ping()
        client.close()
    finally:
        broker.stop()
    assert broker.exited() is None  # stopped on purpose is not "died"
