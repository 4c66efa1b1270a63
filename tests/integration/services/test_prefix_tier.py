"""The shared prefix tier on a real redis-server: LRU under a byte budget, TTL, exact byte accounting under races."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from dsv4.protocol import keys
from dsv4.protocol.connection import connect
from dsv4.services.local_redis import LocalRedis
from dsv4.services.prefix_tier import PrefixTier, TierStats

pytestmark = pytest.mark.integration

DEP = "tier"


@pytest.fixture
async def client(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_server.url)
    yield c
    await c.aclose()


async def _held_bytes(client: aioredis.Redis) -> int:
    """What the blobs present in Redis really weigh."""
    total = 0
    async for key in client.scan_iter(match=keys.prefix_blob_key(DEP, "*")):
        total += int(await client.strlen(key))
    return total


async def test_publish_fetch_and_longest(client: aioredis.Redis) -> None:
    tier = PrefixTier(client, DEP, budget_bytes=1000, ttl_s=60)
    assert await tier.longest(["a", "b", "c"]) == -1
    assert await tier.publish("b", b"x" * 10)
    assert await tier.longest(["a", "b", "c"]) == 1
    assert await tier.fetch("b") == b"x" * 10
    assert await tier.fetch("a") is None
    await tier.discard("b")
    assert await tier.longest(["a", "b"]) == -1
    assert await tier.stats() == TierStats(0, 0)


async def test_the_least_recently_used_prefix_leaves_first_under_the_budget(client: aioredis.Redis) -> None:
    tier = PrefixTier(client, DEP, budget_bytes=300, ttl_s=60)
    for h in ("a", "b", "c"):
        assert await tier.publish(h, h.encode() * 100)
        await asyncio.sleep(0.002)  # distinct LRU stamps
    await tier.fetch("a")  # a is now the most recently used
    await asyncio.sleep(0.002)
    assert await tier.publish("d", b"d" * 100)
    assert await tier.longest(["b"]) == -1, "b was the least recently used"
    assert [await tier.longest([h]) for h in ("a", "c", "d")] == [0, 0, 0]
    stats = await tier.stats()
    assert stats.bytes == await _held_bytes(client) == 300 and stats.prefixes == 3
    assert not await tier.publish("huge", b"z" * 301), "a blob over the whole budget is refused"


async def test_racing_publishers_and_evictors_keep_the_count_exact(client: aioredis.Redis) -> None:
    tier = PrefixTier(client, DEP, budget_bytes=2000, ttl_s=60)
    await asyncio.gather(*(tier.publish("same", b"s" * 100) for _ in range(10)))
    assert (await tier.stats()).bytes == 100, "one prefix published ten times is counted once"
    await asyncio.gather(*(tier.publish(f"p{i}", b"p" * 150) for i in range(40)))
    stats = await tier.stats()
    assert stats.bytes == await _held_bytes(client)
    assert stats.bytes <= 2000


async def test_an_expired_blob_leaves_the_count(client: aioredis.Redis) -> None:
    tier = PrefixTier(client, DEP, budget_bytes=1000, ttl_s=1)
    await tier.publish("old", b"o" * 100)
    await asyncio.sleep(1.2)
    assert await tier.fetch("old") is None
    await tier.publish("new", b"n" * 50)
    assert await tier.stats() == TierStats(50, 1)
