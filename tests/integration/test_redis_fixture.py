"""The real-Redis fixture: a private server that round-trips data and leaves nothing behind."""

from __future__ import annotations

import pytest
import redis

from dsv4.services.local_redis import LocalRedis, RedisServerError

pytestmark = pytest.mark.integration


def test_round_trip_through_a_real_server(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    payload = bytes(range(256)) * 4096
    client.set("blob", payload)
    assert client.get("blob") == payload
    client.xadd("jobs", {"id": "1"})
    assert client.xlen("jobs") == 1
    assert client.info("server")["redis_version"]


def test_each_test_gets_an_empty_server(redis_url: str) -> None:
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_persistence_is_off(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.config_get("save")["save"] == ""
    assert client.config_get("appendonly")["appendonly"] == "no"


def test_stop_frees_the_port_and_kill_restart_loses_data() -> None:
    server = LocalRedis().start()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    client.set("k", "v")
    server.kill()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    server.start()
    assert client.get("k") is None
    server.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_timeout=1).ping()


def test_port_in_use_is_a_clear_error(redis_server: LocalRedis) -> None:
    with pytest.raises(RedisServerError, match=r"exited|did not answer"):
        LocalRedis(port=redis_server.port, startup_timeout=3).start()
