"""The planner against a real Redis whose queues grow and shrink: scales each pool within bounds and ratio,
marks the drained pod with pod-deletion-cost, respects the scale-down cooldown, and records Events."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import redis

from dsv4.protocol import keys
from tests.cluster.control_plane import KubeCluster
from tests.cluster.operator.conftest import OperatorProcess
from tests.cluster.operator.helpers import get_json, wait_until
from tests.cluster.operator.test_examples import apply, pods
from tests.cluster.operator.test_lifecycle import resource

pytestmark = pytest.mark.cluster

DOWN_COOLDOWN_S = 12


def _replicas(cluster: KubeCluster, namespace: str) -> tuple[int, int]:
    spec = get_json(cluster, "dsv4", "auto", "-n", namespace)["spec"]
    return spec["prefill"]["replicas"], spec["decode"]["replicas"]


def _events(cluster: KubeCluster, namespace: str, reason: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(
        cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name=auto,reason={reason}"
    )["items"]
    return items


def test_planner_follows_the_queues(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess, redis_url: str
) -> None:
    spec = {
        "model": {"variant": "tiny"},
        "accelerator": {"type": "cpu"},
        "redis": {"managed": False, "url": redis_url},
        "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
        "autoscaling": {
            "enabled": True,
            "intervalSeconds": 5,
            "targetQueuePerReplica": 4,
            "minPrefillDecodeRatio": 0.5,
            "maxPrefillDecodeRatio": 2,
            "scaleUpCooldownSeconds": 0,
            "scaleDownCooldownSeconds": DOWN_COOLDOWN_S,
        },
    }
    apply(k8s_cluster, k8s_namespace, resource("auto", spec))
    client = redis.Redis.from_url(redis_url)
    key = keys.stream_key("auto", keys.PREFILL_STREAM)
    client.xgroup_create(key, keys.WORKER_GROUP, id="0", mkstream=True)
    ids = [client.xadd(key, {"job": str(i)}) for i in range(40)]

    # 40 waiting prefill jobs: prefill doubles to 2, then 4 (its max); decode follows to keep prefill:decode <= 2.
    wait_until("prefill at max", lambda: _replicas(k8s_cluster, k8s_namespace) == (4, 2), timeout=60)
    assert _events(k8s_cluster, k8s_namespace, "ScaledUp")
    wait_until("4 prefill pods", lambda: len(pods(k8s_cluster, k8s_namespace, "auto", "prefill")) == 4)

    # A worker holds 3 jobs, the others none; then all queued work is done.
    busy = pods(k8s_cluster, k8s_namespace, "auto", "prefill")[0]["metadata"]["name"]
    client.xreadgroup(keys.WORKER_GROUP, busy, {key: ">"}, count=3)
    client.xreadgroup(keys.WORKER_GROUP, "someone-else", {key: ">"}, count=100)
    client.xack(key, keys.WORKER_GROUP, *ids[3:])
    client.xdel(key, *ids[3:])

    wait_until("first scale-down", lambda: _replicas(k8s_cluster, k8s_namespace)[0] == 3, timeout=60)
    [draining] = [e for e in _events(k8s_cluster, k8s_namespace, "Draining") if e["message"].startswith("prefill ")]
    assert busy not in draining["message"]  # the pod holding work is not the one drained
    wait_until("second scale-down", lambda: _replicas(k8s_cluster, k8s_namespace)[0] == 2, timeout=60)

    downs = sorted(
        dt.datetime.fromisoformat(e.get("lastTimestamp") or e["eventTime"]).timestamp()
        for e in _events(k8s_cluster, k8s_namespace, "ScaledDown")
        if e["message"].startswith("prefill ")
    )
    assert len(downs) >= 2 and downs[1] - downs[0] >= DOWN_COOLDOWN_S - 1
    prefill, decode = _replicas(k8s_cluster, k8s_namespace)
    assert 1 <= prefill <= 4 and 1 <= decode <= 3 and 0.5 * decode <= prefill <= 2 * decode
    client.close()
