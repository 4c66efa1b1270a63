"""The prefix-cache figures of the status: the workers' counters from the deployment's prefix-stats hash in Redis.

Every worker writes its engine's counters there with each KV-event snapshot (`services/workers/prefix_sharing.py`);
an entry older than STALE_S is a worker that is gone. `summarize` is pure; `read_prefix_status` does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import redis.asyncio as aioredis

from dsv4.operator import autoscaler, checks
from dsv4.operator.kube import Kube
from dsv4.operator.ownership import Owner
from dsv4.operator.reconcile import now_iso
from dsv4.operator.status import PrefixCacheStatus, PrefixPoolStats
from dsv4.protocol import keys
from dsv4.protocol.connection import RedisUnavailable, unavailable_as_typed

STALE_S = 60.0
POLL_S = 20.0
# the counters' names in an entry (LLMEngine.stats_extra) -> PrefixPoolStats fields
_FIELDS = {
    "prefix_cache_query_tokens": "prompt_tokens",
    "prefix_cache_hit_tokens": "hit_tokens",
    "prefix_cache_queries": "requests",
    "prefix_cache_hits": "hit_requests",
    "prefill_tokens": "computed_tokens",
}


def summarize(entries: Mapping[str, str], now: float, observed_at: str) -> PrefixCacheStatus | None:
    """Sum the live workers' entries per pool; None when no worker reported lately. Malformed entries are skipped."""
    pools: dict[str, dict[str, int]] = {"prefill": {}, "decode": {}}
    for raw in entries.values():
        try:
            entry: dict[str, Any] = json.loads(raw)
            if now - float(entry["t"]) > STALE_S or entry["pool"] not in pools:
                continue
            totals = pools[entry["pool"]]
            totals["workers"] = totals.get("workers", 0) + 1
            for name, field in _FIELDS.items():
                totals[field] = totals.get(field, 0) + int(entry.get(name, 0))
        except (ValueError, KeyError, TypeError):
            continue
    if not any(pools.values()):
        return None
    stats = {pool: PrefixPoolStats(**totals) for pool, totals in pools.items()}
    prompt = sum(s.prompt_tokens for s in stats.values())
    hit = sum(s.hit_tokens for s in stats.values())
    rate = f"{100 * hit / prompt:.1f}%" if prompt else "-"
    return PrefixCacheStatus(hit_rate=rate, observed_at=observed_at, prefill=stats["prefill"], decode=stats["decode"])


async def read_prefix_status(client: aioredis.Redis, deployment: str, observed_at: str) -> PrefixCacheStatus | None:
    """The status figures from the workers' entries now in Redis."""
    with unavailable_as_typed("reading prefix stats"):
        raw: Any = await client.hgetall(keys.prefix_stats_key(deployment))
    entries = {_s(k): _s(v) for k, v in raw.items()}
    return summarize(entries, time.time(), observed_at)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def maybe_report(kube: Kube, body: Mapping[str, Any], memo: MutableMapping[str, Any]) -> bool:
    """Every POLL_S, when the prefix cache is on: read the workers' figures and patch `status.prefixCache` if the
    hit rate or the counters changed. True when it patched. Redis trouble skips a round (the next one retries)."""
    spec, problems = checks.parse(body.get("spec") or {})
    now = time.monotonic()
    if spec is None or problems or not spec.prefix_cache.enabled or now - memo.get("prefix", -1e18) < POLL_S:
        return False
    memo["prefix"] = now
    meta = body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    url = await asyncio.to_thread(autoscaler.redis_url, kube, owner, spec)
    client = aioredis.from_url(
        url, socket_timeout=autoscaler.REDIS_TIMEOUT_S, socket_connect_timeout=autoscaler.REDIS_TIMEOUT_S
    )
    try:
        status = await read_prefix_status(client, owner.name, now_iso())
    except (OSError, aioredis.RedisError, RedisUnavailable):
        return False
    finally:
        await client.aclose()
    if status is None:
        return False
    current = (body.get("status") or {}).get("prefixCache") or {}
    patch = status.model_dump(by_alias=True, mode="json")
    if {k: v for k, v in current.items() if k != "observedAt"} == {k: v for k, v in patch.items() if k != "observedAt"}:
        return False
    await asyncio.to_thread(kube.patch_status, owner.namespace, owner.name, {"prefixCache": patch})
    return True
