"""Rank groups on the real control plane, on both paths: with the LeaderWorkerSet API (the real LWS controller and
its webhooks, built from sigs.k8s.io/lws) and without it (the operator's StatefulSet per group).

`examples/pro-h200.yaml` applies; each decode group is 2 pods on 2 H200 nodes with 8 GPUs each; the rank env is
consistent (WORLD_SIZE 16, node ranks 0/1, one MASTER_ADDR naming the leader's stable DNS name in a headless
Service); deleting one pod restarts the whole group; scaling decode 1 -> 2 adds a whole group. The Ascend 910C
example gets a rank table whose entries match its pods and the devices the (simulated) device plugin gave them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from dsv4.operator import rank_table
from dsv4.protocol import contract, env
from tests.cluster.control_plane import KubeCluster
from tests.cluster.node_pools import NVIDIA_POOL, SUPERPOD_LABEL
from tests.cluster.operator.conftest import OperatorProcess
from tests.cluster.operator.helpers import get_json, wait_until
from tests.cluster.operator.test_examples import apply, example, pods, read_only_volume, secret, wait_ready

pytestmark = pytest.mark.cluster

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_LABEL_REF = re.compile(r"metadata\.labels\['([^']+)'\]")


def resolved_env(pod: dict[str, Any]) -> dict[str, str]:
    """The worker container's env as the kubelet resolves it: `$(VAR)` from the variables before it, and the
    downward API's label and name references from the pod."""
    out: dict[str, str] = {}
    for e in pod["spec"]["containers"][0]["env"]:
        if "value" in e:
            out[e["name"]] = _REF.sub(lambda m: out.get(m.group(1), m.group(0)), e["value"])
            continue
        path = (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath", "")
        label = _LABEL_REF.fullmatch(path)
        if label:
            out[e["name"]] = pod["metadata"]["labels"][label.group(1)]
        elif path == "metadata.name":
            out[e["name"]] = pod["metadata"]["name"]
    return out


def _live(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def check_group(cluster: KubeCluster, namespace: str, group: list[dict[str, Any]]) -> dict[str, Any]:
    """Assert one decode group is consistent; return its leader pod."""
    assert len(group) == 2
    nodes = {p["spec"]["nodeName"] for p in group}
    assert len(nodes) == 2 and nodes <= set(NVIDIA_POOL.node_names), nodes
    envs = [resolved_env(p) for p in group]
    assert {e[env.WORLD_SIZE] for e in envs} == {"16"} and {e[env.NPROC_PER_NODE] for e in envs} == {"8"}
    assert sorted(e[env.NODE_RANK] for e in envs) == ["0", "1"]
    assert {e[env.MASTER_PORT] for e in envs} == {str(contract.RENDEZVOUS_PORT)}
    [master] = {e[env.MASTER_ADDR] for e in envs}
    [leader] = [p for p, e in zip(group, envs, strict=True) if e[env.NODE_RANK] == "0"]
    for pod in group:
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and limits["rdma/rdma_shared_device_a"] == "1"
        assert pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    # The leader's stable DNS name: <hostname>.<subdomain (a headless Service)>.<namespace>[.svc]
    subdomain = leader["spec"]["subdomain"]
    assert master.split(".")[:3] == [leader["spec"].get("hostname", leader["metadata"]["name"]), subdomain, namespace]
    svc = get_json(cluster, "service", subdomain, "-n", namespace)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
    return leader


def decode_groups(cluster: KubeCluster, namespace: str) -> dict[str, list[dict[str, Any]]]:
    """Live decode pods by group index (LWS's label or the fallback's)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for pod in _live(pods(cluster, namespace, "pro-h200", "decode")):
        labels = pod["metadata"]["labels"]
        g = labels.get("dsv4.io/group", labels.get("leaderworkerset.sigs.k8s.io/group-index"))
        out.setdefault(str(g), []).append(pod)
    return out


@pytest.fixture(params=["statefulsets", "lws"])
def workload_api(
    request: pytest.FixtureRequest, k8s_cluster: KubeCluster, running_operator: OperatorProcess
) -> Iterator[str]:
    """Each test runs without LWS (the operator's StatefulSet fallback) and with the real LWS controller. The
    operator notices an API change within `kube.APIS_TTL_S`; it is restarted here so the test need not wait."""
    if request.param == "lws":
        k8s_cluster.start_lws()
        running_operator.stop()
        running_operator.start()
    yield str(request.param)
    if request.param == "lws":
        k8s_cluster.stop_lws()
        running_operator.stop()
        running_operator.start()


def test_pro_h200_rank_groups(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess, workload_api: str
) -> None:
    doc = copy.deepcopy(example("pro-h200"))
    doc["spec"]["autoscaling"]["enabled"] = False  # the test scales by hand
    volume = read_only_volume(k8s_cluster, k8s_namespace, "deepseek-v4-pro")
    try:
        apply(k8s_cluster, k8s_namespace, *volume)
        apply(k8s_cluster, k8s_namespace, doc)
        obj = wait_ready(k8s_cluster, k8s_namespace, "pro-h200", timeout=120)
        assert obj["status"]["decode"] == {"desired": 1, "ready": 1, "updated": 1, "podsPerGroup": 2, "summary": "1/1"}
        kind = "leaderworkerset" if workload_api == "lws" else "statefulset"
        assert k8s_cluster.kubectl("get", kind, "-n", k8s_namespace, "-o", "name").stdout.strip()
        [group] = decode_groups(k8s_cluster, k8s_namespace).values()
        leader = check_group(k8s_cluster, k8s_namespace, group)
        row = k8s_cluster.kubectl("get", "dsv4", "pro-h200", "-n", k8s_namespace, "--no-headers").stdout.split()
        assert row[:4] == ["pro-h200", "Ready", "1/1", "1/1"]

        # Deleting one pod restarts the whole group: the leader comes back as a new pod too.
        [worker] = [p for p in group if p is not leader]
        before = {p["metadata"]["uid"] for p in group}
        k8s_cluster.kubectl("delete", "pod", worker["metadata"]["name"], "-n", k8s_namespace, "--wait=false")

        def restarted() -> list[dict[str, Any]] | None:
            groups = decode_groups(k8s_cluster, k8s_namespace)
            fresh = groups.get("0", [])
            if len(fresh) == 2 and all(_ready(p) for p in fresh) and not {p["metadata"]["uid"] for p in fresh} & before:
                return fresh
            return None

        group = wait_until("the whole group restarted", restarted, 120)
        check_group(k8s_cluster, k8s_namespace, group)
        if workload_api == "statefulsets":
            events = get_json(k8s_cluster, "events", "-n", k8s_namespace, "--field-selector", "reason=GroupRestart")
            assert any("decode group 0 restarts as a unit" in e["message"] for e in events["items"])

        # Scaling decode 1 -> 2 adds a whole group.
        patch = json.dumps({"spec": {"decode": {"replicas": 2}}})
        k8s_cluster.kubectl("patch", "dsv4", "pro-h200", "-n", k8s_namespace, "--type=merge", "-p", patch)

        def two_groups() -> dict[str, list[dict[str, Any]]] | None:
            groups = decode_groups(k8s_cluster, k8s_namespace)
            ok = sorted(groups) == ["0", "1"] and all(len(g) == 2 and all(map(_ready, g)) for g in groups.values())
            return groups if ok else None

        groups = wait_until("a second decode group", two_groups, 120)
        leaders = [check_group(k8s_cluster, k8s_namespace, g) for g in groups.values()]
        assert leaders[0]["metadata"]["name"] != leaders[1]["metadata"]["name"]
        assert len({resolved_env(p)[env.MASTER_ADDR] for g in groups.values() for p in g}) == 2
        wait_until(
            "status 2/2 groups",
            lambda: (
                (get_json(k8s_cluster, "dsv4", "pro-h200", "-n", k8s_namespace).get("status") or {})
                .get("decode", {})
                .get("summary")
                == "2/2"
            ),
            60,
        )
    finally:
        k8s_cluster.kubectl("delete", "dsv4", "--all", "-n", k8s_namespace, "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", volume[0]["metadata"]["name"], "--wait=false", check=False)


def _plugin_annotation(pod: dict[str, Any], node: dict[str, Any], index: int) -> str:
    """What the Ascend device plugin writes on a pod it gives 16 NPU dies to, on node `index` of the pool."""
    superpod = int(node["metadata"]["labels"][SUPERPOD_LABEL])
    devices = [
        {"device_id": str(i), "device_ip": f"192.168.{index}.{i}", "super_device_id": str(index * 16 + i)}
        for i in range(16)
    ]
    return json.dumps(
        {
            "pod_name": pod["metadata"]["name"],
            "server_id": f"10.63.1.{index}",
            "super_pod_id": superpod,
            "devices": devices,
        }
    )


def test_ascend_910c_group_gets_its_rank_table(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess
) -> None:
    doc = copy.deepcopy(example("pro-ascend-910c"))
    doc["spec"]["decode"].update(replicas=1)
    doc["spec"]["autoscaling"]["enabled"] = False
    # A one-pod prefill replica (a group of one) next to the two-pod decode group. Pro does not fit one 910C node
    # (the operator's fit check would refuse it), so this deployment says its checkpoint is a custom one.
    doc["spec"]["model"]["variant"] = "custom"
    doc["spec"]["prefill"].update(podsPerReplica=1, parallelism={"tensor": 16, "data": 1, "expert": True})
    volume = read_only_volume(k8s_cluster, k8s_namespace, "deepseek-v4-pro")
    try:
        apply(
            k8s_cluster, k8s_namespace, *volume, secret("dsv4-redis", password="pw"), secret("dsv4-api-keys", keys="k")
        )
        apply(k8s_cluster, k8s_namespace, doc)
        wait_ready(k8s_cluster, k8s_namespace, "pro-910c", timeout=120)
        workers = _live(pods(k8s_cluster, k8s_namespace, "pro-910c", "decode"))
        workers += _live(pods(k8s_cluster, k8s_namespace, "pro-910c", "prefill"))
        for pod in workers:
            # Until the device plugin has allocated, the file says "initializing".
            initial = json.loads(pod["metadata"]["annotations"][rank_table.TABLE_ANNOTATION])
            assert initial == {"status": contract.RANK_TABLE_INITIALIZING}
        index = {}
        for pod in workers:  # the (simulated) Ascend device plugin's Allocate
            node = get_json(k8s_cluster, "node", pod["spec"]["nodeName"])
            node_index = int(pod["spec"]["nodeName"].rsplit("-", 1)[1])
            index[pod["metadata"]["name"]] = node_index
            value = _plugin_annotation(pod, node, node_index)
            k8s_cluster.kubectl(
                "annotate",
                "pod",
                pod["metadata"]["name"],
                "-n",
                k8s_namespace,
                f"{rank_table.DEVICE_ANNOTATION}={value}",
            )

        def tables() -> dict[str, dict[str, Any]] | None:
            out = {}
            for pod in _live(pods(k8s_cluster, k8s_namespace, "pro-910c", "decode")):
                t = json.loads(pod["metadata"]["annotations"][rank_table.TABLE_ANNOTATION])
                if t["status"] != contract.RANK_TABLE_COMPLETED:
                    return None
                out[pod["metadata"]["name"]] = t
            return out if len(out) == 2 else None

        got = wait_until("the decode group's rank table", tables, 60)
        [table] = {json.dumps(t, sort_keys=True) for t in got.values()}  # every pod of the group reads the same
        t = json.loads(table)
        assert t["version"] == "1.2" and t["server_count"] == "2"
        decode = {p["metadata"]["name"]: p for p in _live(pods(k8s_cluster, k8s_namespace, "pro-910c", "decode"))}
        by_rank = sorted(decode.values(), key=lambda p: int(p["metadata"]["labels"]["apps.kubernetes.io/pod-index"]))
        for node_rank, (server, pod) in enumerate(zip(t["server_list"], by_rank, strict=True)):
            i = index[pod["metadata"]["name"]]
            assert server["container_ip"] == pod["status"]["podIP"] and server["server_id"] == f"10.63.1.{i}"
            assert [d["device_id"] for d in server["device"]] == [str(d) for d in range(16)]
            assert [d["rank_id"] for d in server["device"]] == [str(node_rank * 16 + d) for d in range(16)]
            assert server["device"][5]["device_ip"] == f"192.168.{i}.5"
        [superpod] = t["super_pod_list"]
        assert [s["server_id"] for s in superpod["server_list"]] == [s["server_id"] for s in t["server_list"]]
        # A one-pod replica is a group of one: its own table with ranks 0..15.
        [prefill] = _live(pods(k8s_cluster, k8s_namespace, "pro-910c", "prefill"))
        own = wait_until(
            "the prefill pod's rank table",
            lambda: json.loads(
                get_json(k8s_cluster, "pod", prefill["metadata"]["name"], "-n", k8s_namespace)["metadata"][
                    "annotations"
                ][rank_table.TABLE_ANNOTATION]
            ).get("server_list"),
            60,
        )
        assert len(own) == 1 and own[0]["device"][-1]["rank_id"] == "15"
    finally:
        k8s_cluster.kubectl("delete", "dsv4", "--all", "-n", k8s_namespace, "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", volume[0]["metadata"]["name"], "--wait=false", check=False)
