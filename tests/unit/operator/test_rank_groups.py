"""Rank groups: the workload shape per pool and cluster, the rank env of every pod, spreading and fabric domains,
group readiness, and which groups the operator restarts as a unit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dsv4.operator import builders, ownership, rank_groups
from dsv4.operator.builders import ClusterApis
from dsv4.operator.ownership import Owner
from dsv4.operator.rank_groups import Layout, Shape
from dsv4.protocol import contract, env

from .conftest import Admit

pytestmark = pytest.mark.unit

OWNER = Owner(name="pro", namespace="serving", uid="uid-1")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
LWS = ClusterApis(leader_worker_set=True)
NO_LWS = ClusterApis()


def _example(admit: Admit, name: str) -> Any:
    doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return admit(doc["spec"], name=doc["metadata"]["name"])


def _kids(admit: Admit, apis: ClusterApis, name: str = "pro-h200") -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in builders.children(OWNER, _example(admit, name), "img", apis)}


def _env(template: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in template["spec"]["containers"][0]["env"]}


def test_shape_follows_pods_per_replica_and_the_cluster() -> None:
    assert rank_groups.shape(1, True) is Shape.SINGLE and rank_groups.shape(1, False) is Shape.SINGLE
    assert rank_groups.shape(2, True) is Shape.LWS
    assert rank_groups.shape(2, False) is Shape.STATEFULSETS


def test_pro_h200_decode_is_a_leader_worker_set_of_two_pods(admit: Admit) -> None:
    kids = _kids(admit, LWS)
    lws = kids[("LeaderWorkerSet", "pro-decode")]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    assert spec["replicas"] == 1 and spec["startupPolicy"] == "LeaderCreated"
    assert spec["networkConfig"] == {"subdomainPolicy": "UniquePerReplica"}
    template = spec["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    pod = template["workerTemplate"]
    got = _env(pod)
    assert got[env.MASTER_ADDR] == "$(LWS_LEADER_ADDRESS)" and got[env.NODE_RANK] == "$(LWS_WORKER_INDEX)"
    assert (got[env.WORLD_SIZE], got[env.NPROC_PER_NODE]) == ("16", "8")
    assert got[env.MASTER_PORT] == str(contract.RENDEZVOUS_PORT)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # Prefill (one pod per replica) stays a Deployment; nothing else is a StatefulSet group.
    assert ("Deployment", "pro-prefill") in kids and ("Deployment", "pro-decode") not in kids
    assert [k for k in kids if k[0] == "StatefulSet"] == [("StatefulSet", "pro-redis")]


def test_without_lws_each_group_is_a_stateful_set_with_its_headless_service(admit: Admit) -> None:
    spec = _example(admit, "pro-h200").model_copy(deep=True)
    spec.decode.replicas = 2
    kids = {(c["kind"], c["metadata"]["name"]): c for c in builders.children(OWNER, spec, "img", NO_LWS)}
    for g in (0, 1):
        name = f"pro-decode-{g}"
        sts, svc = kids[("StatefulSet", name)], kids[("Service", name)]
        assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == name
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        selector = sts["spec"]["selector"]["matchLabels"]
        assert svc["spec"]["selector"] == selector and selector[rank_groups.GROUP_LABEL] == str(g)
        assert selector.items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        got = _env(sts["spec"]["template"])
        assert got[env.MASTER_ADDR] == f"{name}-0.{name}.serving.svc"
        assert got[env.NODE_RANK] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert got[env.WORLD_SIZE] == "16"
    assert ("LeaderWorkerSet", "pro-decode") not in kids
    # The pool's own Service (metrics, direct KV plane) and budget still cover every group.
    assert kids[("Service", "pro-decode")]["spec"]["selector"] == ownership.labels(OWNER, "decode")


def test_single_pod_replicas_are_their_own_group(admit: Admit) -> None:
    got = _env(_kids(admit, LWS)[("Deployment", "pro-prefill")]["spec"]["template"])
    assert (got[env.MASTER_ADDR], got[env.NODE_RANK], got[env.WORLD_SIZE], got[env.NPROC_PER_NODE]) == (
        "127.0.0.1",
        "0",
        "8",
        "8",
    )


@pytest.mark.parametrize("apis", [LWS, NO_LWS], ids=["lws", "statefulsets"])
def test_a_group_spreads_over_nodes(admit: Admit, apis: ClusterApis) -> None:
    kids = _kids(admit, apis)
    template = (
        kids[("LeaderWorkerSet", "pro-decode")]["spec"]["leaderWorkerTemplate"]["workerTemplate"]
        if apis.leader_worker_set
        else kids[("StatefulSet", "pro-decode-0")]["spec"]["template"]
    )
    [term] = template["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    if apis.leader_worker_set:
        assert term["matchLabelKeys"] == [rank_groups.LWS_GROUP_KEY_LABEL]
    else:
        assert term["labelSelector"]["matchLabels"][rank_groups.GROUP_LABEL] == "0"
    assert "podAffinity" not in template["spec"]["affinity"]  # no fabric domain asked for


def test_a_topology_key_keeps_a_group_in_one_fabric_domain(admit: Admit) -> None:
    spec = _example(admit, "pro-h200").model_copy(deep=True)
    spec.accelerator.fabric.topology_key = "nvidia.com/gpu.clique"
    kids = {(c["kind"], c["metadata"]["name"]): c for c in builders.children(OWNER, spec, "img", LWS)}
    pod = kids[("LeaderWorkerSet", "pro-decode")]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "nvidia.com/gpu.clique" and term["matchLabelKeys"] == [
        rank_groups.LWS_GROUP_KEY_LABEL
    ]
    # A one-pod replica is always inside one domain: no affinity at all.
    assert "affinity" not in kids[("Deployment", "pro-prefill")]["spec"]["template"]["spec"]


def test_910c_groups_stay_in_one_super_pod(admit: Admit) -> None:
    kids = _kids(admit, NO_LWS, "pro-ascend-910c")
    pod = kids[("StatefulSet", "pro-decode-0")]["spec"]["template"]["spec"]
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "huawei.com/topotree.superpodid"
    assert _env(kids[("StatefulSet", "pro-decode-0")]["spec"]["template"])[env.WORLD_SIZE] == "32"


def test_scaling_adds_and_removes_whole_groups(admit: Admit) -> None:
    spec = _example(admit, "pro-h200").model_copy(deep=True)
    names = []
    for replicas in (1, 3, 2):
        spec.decode.replicas = replicas
        kids = builders.children(OWNER, spec, "img", NO_LWS)
        names.append(sorted(c["metadata"]["name"] for c in kids if c["metadata"]["name"].startswith("pro-decode-")))
    # Each group is a StatefulSet and its Service of the same name.
    assert names == [
        ["pro-decode-0"] * 2,
        ["pro-decode-0"] * 2 + ["pro-decode-1"] * 2 + ["pro-decode-2"] * 2,
        ["pro-decode-0"] * 2 + ["pro-decode-1"] * 2,
    ]


def test_layout_world_size() -> None:
    assert Layout(pods=2, ranks_per_pod=8).world_size == 16
    with pytest.raises(ValueError, match="leader"):
        rank_groups.rank_env(Shape.STATEFULSETS, Layout(2, 8))


def _pod(name: str, group: str | None, ready: bool = True, **extra: Any) -> dict[str, Any]:
    labels = {} if group is None else {rank_groups.GROUP_LABEL: group}
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}", "labels": labels}
    meta["annotations"] = extra.pop("annotations", {})
    if extra.pop("terminating", False):
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **extra}
    return {"metadata": meta, "status": status}


def _refs(*names: str) -> list[tuple[str, str]]:
    return [(n, f"uid-{n}") for n in names]


def test_a_group_is_ready_only_when_every_pod_is() -> None:
    pods = [
        _pod("a-0", "0"),
        _pod("a-1", "0"),
        _pod("b-0", "1"),
        _pod("b-1", "1", ready=False),
        _pod("c-0", "2"),
        _pod("c-1", "2", terminating=True),
        _pod("d-0", "3"),  # its second pod does not exist yet
    ]
    assert rank_groups.ready_groups(pods, 2) == 1


def test_lws_pods_are_grouped_by_the_lws_group_index() -> None:
    pods = [
        {
            "metadata": {"name": f"p-{i}", "labels": {rank_groups.LWS_GROUP_INDEX_LABEL: "0"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i in range(2)
    ]
    assert rank_groups.ready_groups(pods, 2) == 1
    assert rank_groups.restarts(pods) == [] and rank_groups.memberships(pods, 2) == {}  # LWS restarts its own


def test_a_deleted_pod_restarts_its_whole_group_once() -> None:
    pods = [_pod("g0-0", "0"), _pod("g0-1", "0", terminating=True), _pod("g1-0", "1"), _pod("g1-1", "1")]
    [restart] = rank_groups.restarts(pods)
    assert restart.group == "0" and "g0-1 was deleted" in restart.reason
    assert restart.mark == _refs("g0-0", "g0-1") and restart.delete == _refs("g0-0")
    # After the operator marked and deleted them, the terminating pods trigger nothing, and the fresh pod neither.
    marked = {"annotations": {rank_groups.RESTART_ANNOTATION: restart.reason}}
    after = [
        _pod("g0-0", "0", terminating=True, **marked),
        _pod("g0-1", "0", terminating=True, **marked),
        _pod("g0-1-new", "0", ready=False),
        _pod("g1-0", "1"),
        _pod("g1-1", "1"),
    ]
    assert rank_groups.restarts(after) == []


def test_a_restarted_container_or_failed_pod_restarts_the_group() -> None:
    crashed = _pod("g-0", "0", containerStatuses=[{"name": "decode", "restartCount": 1}])
    [restart] = rank_groups.restarts([crashed, _pod("g-1", "0")])
    assert "container decode restarted" in restart.reason and restart.delete == _refs("g-0", "g-1")
    evicted = _pod("h-0", "0", phase="Failed", reason="Evicted")
    [restart] = rank_groups.restarts([evicted, _pod("h-1", "0")])
    assert "failed (Evicted)" in restart.reason
    init = _pod("i-0", "0", initContainerStatuses=[{"name": "prewarm-weights", "restartCount": 2}])
    assert rank_groups.restarts([init])[0].reason.endswith("container prewarm-weights restarted")
    assert rank_groups.restarts([_pod("j-0", "0"), _pod("j-1", "0")]) == []


def test_a_member_replaced_unseen_restarts_the_others() -> None:
    # The group formed: both pods carry the member uids.
    formed = [_pod("g-0", "0"), _pod("g-1", "0")]
    joins = rank_groups.memberships(formed, 2)
    assert joins == {ref: "uid-g-0,uid-g-1" for ref in _refs("g-0", "g-1")}
    ann = {"annotations": {rank_groups.MEMBERS_ANNOTATION: "uid-g-0,uid-g-1"}}
    joined = [_pod("g-0", "0", **ann), _pod("g-1", "0", **ann)]
    assert rank_groups.memberships(joined, 2) == {} and rank_groups.restarts(joined) == []
    # g-1 was deleted and recreated (same name, new uid) between two looks of the operator.
    replaced = [
        _pod("g-0", "0", **ann),
        {**_pod("g-1", "0"), "metadata": {**_pod("g-1", "0")["metadata"], "uid": "new"}},
    ]
    [restart] = rank_groups.restarts(replaced)
    assert "g-1 replaced a member" in restart.reason
    assert restart.delete == _refs("g-0")  # the old member goes; the new one is fresh already
    # An incomplete group is not joined until every pod is there.
    assert rank_groups.memberships([_pod("k-0", "0")], 2) == {}
