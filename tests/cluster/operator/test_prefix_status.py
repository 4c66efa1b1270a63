"""The status shows the workers' prefix-cache hit rate, read from a real Redis, and `kubectl get dsv4 -o wide` its
column (the workers' entries are written here as a worker writes them)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from dsv4.protocol import keys
from tests.cluster.control_plane import KubeCluster
from tests.cluster.operator.conftest import OperatorProcess
from tests.cluster.operator.helpers import get_json, wait_until
from tests.cluster.operator.test_examples import apply
from tests.cluster.operator.test_lifecycle import resource

pytestmark = pytest.mark.cluster


def _entry(pool: str, hit: int, prompt: int) -> str:
    return json.dumps(
        {
            "pool": pool,
            "t": time.time(),
            "prefix_cache_hit_tokens": hit,
            "prefix_cache_query_tokens": prompt,
            "prefix_cache_hits": 3,
            "prefix_cache_queries": 4,
            "prefill_tokens": prompt - hit,
        }
    )


def test_the_hit_rate_reaches_the_status_and_the_wide_table(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(
        keys.prefix_stats_key("pfx"), mapping={"p1": _entry("prefill", 750, 1000), "d1": _entry("decode", 0, 0)}
    )
    spec = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}, "redis": {"managed": False, "url": redis_url}}
    apply(k8s_cluster, k8s_namespace, resource("pfx", spec))

    def prefix_status() -> dict[str, object]:
        status = get_json(k8s_cluster, "dsv4", "pfx", "-n", k8s_namespace).get("status") or {}
        return status.get("prefixCache") or {}

    wait_until("prefix hit rate in the status", lambda: prefix_status().get("hitRate") == "75.0%", timeout=60)
    figures = prefix_status()
    assert figures["prefill"] == {  # type: ignore[comparison-overlap]
        "workers": 1, "promptTokens": 1000, "hitTokens": 750, "requests": 4, "hitRequests": 3, "computedTokens": 250,
    }  # fmt: skip
    table = k8s_cluster.kubectl("get", "dsv4", "pfx", "-n", k8s_namespace, "-o", "wide").stdout.splitlines()
    header = table[0].split()
    assert "PREFIX" in header and table[1].split()[header.index("PREFIX")] == "75.0%"
    # the children's status refresh leaves the figures alone
    wait_until(
        "another status refresh",
        lambda: (get_json(k8s_cluster, "dsv4", "pfx", "-n", k8s_namespace)["status"] or {}).get("endpoint"),
        timeout=60,
    )
    assert prefix_status().get("hitRate") == "75.0%"
    k8s_cluster.kubectl("delete", "dsv4", "pfx", "-n", k8s_namespace, "--wait=false")
