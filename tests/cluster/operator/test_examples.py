"""helm install + kubectl apply of each example: the right children, pods on the right pools with the right
resources, env and tolerations, status Ready with the printer columns showing it, delete garbage-collects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsv4.protocol import contract, env
from tests.cluster.control_plane import KubeCluster
from tests.cluster.node_pools import ASCEND_A3_POOL, CPU_POOL, NVIDIA_POOL, SUPERPOD_LABEL, NodePool
from tests.cluster.operator.conftest import OperatorProcess
from tests.cluster.operator.helpers import get_json, wait_until

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
INSTANCE = "app.kubernetes.io/instance"


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return doc


def apply(cluster: KubeCluster, namespace: str, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def read_only_volume(cluster: KubeCluster, namespace: str, claim: str) -> list[dict[str, Any]]:
    """A statically bound PV + PVC, as an admin would provide for model weights."""
    pv = f"{namespace}-{claim}"[:63]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "2Ti"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": "/models"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "2Ti"}},
            },
        },
    ]


def secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def children(cluster: KubeCluster, namespace: str, name: str) -> set[tuple[str, str]]:
    kinds = "configmaps,services,deployments,statefulsets,poddisruptionbudgets"
    items = get_json(cluster, kinds, "-n", namespace, "-l", f"{INSTANCE}={name}")["items"]
    return {(i["kind"], i["metadata"]["name"]) for i in items}


def expected_children(name: str, managed_redis: bool, groups: dict[str, int] | None = None) -> set[tuple[str, str]]:
    """The children of a deployment whose pools are Deployments, except those in `groups` (role -> replicas), whose
    replicas are multi-pod groups of the StatefulSet fallback (no LWS in the cluster)."""
    groups = groups or {}
    out = {("ConfigMap", f"{name}-config")}
    for role in ("gateway", "prefill", "decode"):
        out |= {(k, f"{name}-{role}") for k in ("Service", "PodDisruptionBudget")}
        if role in groups:
            out |= {(k, f"{name}-{role}-{g}") for g in range(groups[role]) for k in ("StatefulSet", "Service")}
        else:
            out.add(("Deployment", f"{name}-{role}"))
    if managed_redis:
        out |= {("StatefulSet", f"{name}-redis"), ("Service", f"{name}-redis")}
    return out


def wait_ready(cluster: KubeCluster, namespace: str, name: str, timeout: float = 90) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj: dict[str, Any] = get_json(cluster, "dsv4", name, "-n", namespace)
        return obj if (obj.get("status") or {}).get("phase") == "Ready" else None

    try:
        result: dict[str, Any] = wait_until(f"{name} Ready", ready, timeout)
    except AssertionError as err:
        status = get_json(cluster, "dsv4", name, "-n", namespace).get("status")
        events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
        pods = cluster.kubectl("get", "pods,deployments", "-n", namespace, "-o", "wide").stdout
        pods += cluster.kubectl(
            "get",
            "pods",
            "-n",
            namespace,
            "-o",
            'jsonpath={range .items[*]}{.metadata.name} Ready={.status.conditions[?(@.type=="Ready")].status}'
            ' containers={.status.containerStatuses[*].ready}{"\\n"}{end}',
        ).stdout
        raise AssertionError(f"{err}\nstatus: {status}\nevents:\n{events.stdout}\n{pods}") from None
    return result


def pods(cluster: KubeCluster, namespace: str, name: str, component: str) -> list[dict[str, Any]]:
    sel = f"{INSTANCE}={name},app.kubernetes.io/component={component}"
    items: list[dict[str, Any]] = get_json(cluster, "pods", "-n", namespace, "-l", sel)["items"]
    return items


def assert_on_pool(pod: dict[str, Any], pool: NodePool) -> None:
    assert pod["spec"].get("nodeName") in pool.node_names, (pod["metadata"]["name"], pod["spec"].get("nodeName"))


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_tiny_cpu_example(k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess) -> None:
    doc = example("tiny-cpu")
    apply(k8s_cluster, k8s_namespace, doc)
    obj = wait_ready(k8s_cluster, k8s_namespace, "tiny-cpu")
    assert children(k8s_cluster, k8s_namespace, "tiny-cpu") == expected_children("tiny-cpu", managed_redis=True)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["endpoint"] == f"http://tiny-cpu-gateway.{k8s_namespace}.svc:{contract.GATEWAY_PORT}"
    settled = {
        "Ready": ("True", "AllPoolsReady"),
        "Progressing": ("False", "Stable"),
        "Degraded": ("False", "AsExpected"),
    }

    def conditions() -> dict[str, tuple[str, str]]:
        status = get_json(k8s_cluster, "dsv4", "tiny-cpu", "-n", k8s_namespace)["status"]
        return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}

    # Ready follows the pods; Progressing settles once the Deployments report the rollout done.
    wait_until("conditions settled", lambda: conditions() == settled, 90)
    for component in ("gateway", "prefill", "decode", "redis"):
        for pod in pods(k8s_cluster, k8s_namespace, "tiny-cpu", component):
            assert_on_pool(pod, CPU_POOL)
    table = k8s_cluster.kubectl("get", "dsv4", "-n", k8s_namespace).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "PHASE", "PREFILL", "DECODE", "ENDPOINT"]
    assert table[1].split()[:4] == ["tiny-cpu", "Ready", "1/1", "1/1"]
    events = get_json(k8s_cluster, "events", "-n", k8s_namespace, "--field-selector", "involvedObject.name=tiny-cpu")
    assert {"Created"} <= {e["reason"] for e in events["items"]}

    k8s_cluster.kubectl("delete", "dsv4", "tiny-cpu", "-n", k8s_namespace, "--wait=true")
    wait_until("children garbage-collected", lambda: not children(k8s_cluster, k8s_namespace, "tiny-cpu"), 60)
    wait_until("pods gone", lambda: not get_json(k8s_cluster, "pods", "-n", k8s_namespace)["items"], 60)


def test_flash_on_h200_example(k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess) -> None:
    doc = example("flash-h200")
    volume = read_only_volume(k8s_cluster, k8s_namespace, "deepseek-v4-flash")
    try:
        apply(k8s_cluster, k8s_namespace, *volume)
        apply(k8s_cluster, k8s_namespace, doc)
        wait_ready(k8s_cluster, k8s_namespace, "flash-h200")
        for component in ("prefill", "decode"):
            worker_pods = pods(k8s_cluster, k8s_namespace, "flash-h200", component)
            assert len(worker_pods) == 2
            for pod in worker_pods:
                assert_on_pool(pod, NVIDIA_POOL)
                c = pod["spec"]["containers"][0]
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
                    "tolerations"
                ]
                assert _env(pod)[env.DEVICE] == "cuda" and _env(pod)[env.MODEL] == contract.MODEL_DIR
                assert _env(pod)[env.DTYPE] == "bfloat16"
                assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["spec"]["volumes"])
        for pod in pods(k8s_cluster, k8s_namespace, "flash-h200", "gateway"):
            assert_on_pool(pod, CPU_POOL)
            assert env.MODEL not in _env(pod)  # the gateway reads the bundled tokenizer, mounts no weights
    finally:
        k8s_cluster.kubectl("delete", "dsv4", "--all", "-n", k8s_namespace, "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", volume[0]["metadata"]["name"], "--wait=false", check=False)


def test_pro_on_ascend_example(k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess) -> None:
    doc = copy.deepcopy(example("pro-ascend-910c"))
    doc["spec"]["decode"].update(replicas=1)  # the simulated A3 pool (6 nodes): a prefill and a decode group of 2
    volume = read_only_volume(k8s_cluster, k8s_namespace, "deepseek-v4-pro")
    try:
        apply(
            k8s_cluster, k8s_namespace, *volume, secret("dsv4-redis", password="pw"), secret("dsv4-api-keys", keys="k1")
        )
        apply(k8s_cluster, k8s_namespace, doc)
        obj = wait_ready(k8s_cluster, k8s_namespace, "pro-910c")
        assert obj["status"]["decode"]["podsPerGroup"] == 2 and obj["status"]["decode"]["summary"] == "1/1"
        assert children(k8s_cluster, k8s_namespace, "pro-910c") == expected_children(
            "pro-910c", managed_redis=False, groups={"prefill": 1, "decode": 1}
        )
        decode = pods(k8s_cluster, k8s_namespace, "pro-910c", "decode")
        assert len(decode) == 2 and len({p["spec"]["nodeName"] for p in decode}) == 2
        superpods = set()
        for pod in [*decode, *pods(k8s_cluster, k8s_namespace, "pro-910c", "prefill")]:
            assert_on_pool(pod, ASCEND_A3_POOL)
            c = pod["spec"]["containers"][0]
            assert c["resources"]["limits"]["huawei.com/Ascend910"] == "16"
            assert pod["spec"]["securityContext"]["supplementalGroups"] == [1000]
            got = _env(pod)
            assert got["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(16))
            assert got["HCCL_IF_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
            assert got[env.REDIS_PASSWORD]["secretKeyRef"] == {"name": "dsv4-redis", "key": "password"}
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/usr/local/Ascend/driver", "/etc/hccn.conf", contract.RANK_TABLE_DIR} <= mounts
        for pod in decode:
            node = get_json(k8s_cluster, "node", pod["spec"]["nodeName"])
            superpods.add(node["metadata"]["labels"][SUPERPOD_LABEL])
        assert len(superpods) == 1  # the group stays inside one super pod
        [gw] = pods(k8s_cluster, k8s_namespace, "pro-910c", "gateway")
        assert _env(gw)[env.API_KEY_FILE] == contract.API_KEY_FILE and env.MODEL not in _env(gw)
    finally:
        k8s_cluster.kubectl("delete", "dsv4", "--all", "-n", k8s_namespace, "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", volume[0]["metadata"]["name"], "--wait=false", check=False)
