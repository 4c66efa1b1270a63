"""The planner fed by a real Redis whose consumer-group lag and pending grow and shrink."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from dsv4.operator import planner, signals
from dsv4.protocol import keys

pytestmark = pytest.mark.integration

POLICY = planner.Policy(queue_per_replica=4, min_ratio=0.5, max_ratio=2.0, up_cooldown_s=0, down_cooldown_s=0)


def _pool(replicas: int, backlog: int) -> planner.PoolInput:
    return planner.PoolInput(replicas, 1, 6, backlog, None, 1000.0, None)


async def test_backlog_follows_xadd_xreadgroup_xack(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    key = keys.stream_key("demo", keys.PREFILL_STREAM)
    try:
        assert (await signals.queue_signal(client, "demo", keys.PREFILL_STREAM)).backlog == 0
        await client.xgroup_create(key, keys.WORKER_GROUP, id="0", mkstream=True)
        ids = [await client.xadd(key, {"job": str(i)}) for i in range(24)]
        sig = await signals.queue_signal(client, "demo", keys.PREFILL_STREAM)
        assert sig.backlog == 24 and sig.pending_by_consumer == {}

        # Two workers take 5 and 3 jobs: lag 16 + pending 8 is still 24, now attributed per pod.
        await client.xreadgroup(keys.WORKER_GROUP, "prefill-a", {key: ">"}, count=5)
        await client.xreadgroup(keys.WORKER_GROUP, "prefill-b", {key: ">"}, count=3)
        sig = await signals.queue_signal(client, "demo", keys.PREFILL_STREAM)
        assert sig.backlog == 24 and sig.pending_by_consumer == {"prefill-a": 5, "prefill-b": 3}

        p, d = planner.plan(_pool(2, sig.backlog), _pool(2, 0), POLICY)
        assert p.desired == 4 and d.desired == 2  # backlog 24 / 4 per replica, capped at double

        # Workers finish everything: acknowledged and deleted, as services.work_queue does it.
        await client.xreadgroup(keys.WORKER_GROUP, "prefill-a", {key: ">"}, count=100)
        for entry in ids:
            await client.xack(key, keys.WORKER_GROUP, entry)
            await client.xdel(key, entry)
        sig = await signals.queue_signal(client, "demo", keys.PREFILL_STREAM)
        assert sig.backlog == 0
        p, _ = planner.plan(_pool(4, sig.backlog), _pool(2, 0), POLICY)
        assert p.desired == 3  # one step down at a time
        victims = planner.pick_drain_victims(
            [(c, True, n) for c, n in sig.pending_by_consumer.items()], p.current - p.desired
        )
        assert len(victims) == 1
    finally:
        await client.aclose()
