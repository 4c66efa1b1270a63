"""The status's prefix-cache figures from the workers' entries (pure), and their read from a real redis-server."""

from __future__ import annotations

import json
import time

import pytest

from dsv4.operator.prefix_status import read_prefix_status, summarize
from dsv4.protocol import keys
from dsv4.protocol.connection import connect
from dsv4.services.local_redis import LocalRedis

pytestmark = pytest.mark.unit


def _entry(pool: str, t: float, hit: int, prompt: int, computed: int = 0) -> str:
    return json.dumps(
        {
            "pool": pool,
            "t": t,
            "prefix_cache_hit_tokens": hit,
            "prefix_cache_query_tokens": prompt,
            "prefix_cache_hits": 1 if hit else 0,
            "prefix_cache_queries": 1,
            "prefill_tokens": computed,
        }
    )


def test_live_workers_are_summed_per_pool_and_stale_or_broken_entries_skipped() -> None:
    now = 1000.0
    entries = {
        "p1": _entry("prefill", now - 1, hit=600, prompt=1000, computed=400),
        "p2": _entry("prefill", now - 5, hit=300, prompt=1000, computed=700),
        "d1": _entry("decode", now - 2, hit=0, prompt=500, computed=500),
        "old": _entry("prefill", now - 600, hit=10_000, prompt=10_000),
        "junk": "{not json",
        "other": _entry("mystery", now, hit=1, prompt=1),
    }
    status = summarize(entries, now, "2026-01-01T00:00:00Z")
    assert status is not None
    assert status.prefill.workers == 2 and status.prefill.hit_tokens == 900 and status.prefill.prompt_tokens == 2000
    assert status.prefill.computed_tokens == 1100 and status.prefill.hit_requests == 2
    assert status.decode.workers == 1 and status.decode.hit_tokens == 0
    assert status.hit_rate == "36.0%"  # 900 of 2500 prompt tokens
    assert summarize({"old": entries["old"]}, now, "x") is None


async def test_read_from_redis(redis_server: LocalRedis) -> None:
    client = connect(redis_server.url)
    try:
        assert await read_prefix_status(client, "dep", "now") is None
        await client.hset(keys.prefix_stats_key("dep"), "p1", _entry("prefill", time.time(), 50, 200))
        status = await read_prefix_status(client, "dep", "now")
        assert status is not None and status.hit_rate == "25.0%" and status.observed_at == "now"
    finally:
        await client.aclose()
