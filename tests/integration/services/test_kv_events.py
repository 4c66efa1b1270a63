"""KV events through a real redis-server: a reader that starts late still learns what the workers hold."""

from __future__ import annotations

import asyncio

import pytest

from dsv4.protocol.connection import connect
from dsv4.services.kv_events import KVEvent, PrefixIndex, WorkerLoad, follow, publish
from dsv4.services.local_redis import LocalRedis

pytestmark = pytest.mark.integration

H = [f"{i:032x}" for i in range(4)]


async def test_follow_reads_the_history_then_new_events(redis_server: LocalRedis) -> None:
    client = connect(redis_server.url)
    try:
        await publish(client, "ev", "prefill", KVEvent("w1", "snapshot", (H[0],), 16, WorkerLoad(1, 0)))
        await client.xadd("dsv4:{ev}:kv-events:prefill", {b"junk": b"1"})  # a malformed entry is skipped, not fatal
        index, stop = PrefixIndex(), asyncio.Event()
        reader = asyncio.create_task(follow(client, "ev", "prefill", index, stop))
        await publish(client, "ev", "prefill", KVEvent("w2", "stored", (H[0], H[1]), 16))
        for _ in range(100):
            if index.matched_blocks([H[0], H[1]]) == {"w1": 1, "w2": 2}:
                break
            await asyncio.sleep(0.05)
        assert index.matched_blocks([H[0], H[1]]) == {"w1": 1, "w2": 2}
        assert index.block_size == 16
        stop.set()
        await asyncio.wait_for(reader, 5)
    finally:
        await client.aclose()
