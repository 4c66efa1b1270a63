"""The chart lints clean and grants the operator only what it needs."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.cluster.control_plane import KubeCluster
from tests.cluster.operator.conftest import CHART

pytestmark = pytest.mark.cluster


def _render(cluster: KubeCluster, *sets: str) -> list[dict[str, Any]]:
    args = [a for s in sets for a in ("--set", s)]
    out = cluster.helm("template", "dsv4", str(CHART), "--namespace", "dsv4-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_lint_is_clean(k8s_cluster: KubeCluster) -> None:
    for values in ([], ["watchNamespaces={team-a,team-b}"]):
        done = k8s_cluster.helm("lint", str(CHART), *[a for v in values for a in ("--set", v)])
        assert "0 chart(s) failed" in done.stdout and "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout


def test_rbac_is_least_privilege(k8s_cluster: KubeCluster) -> None:
    roles = {d["metadata"]["name"]: d for d in _render(k8s_cluster) if d["kind"] == "ClusterRole"}
    assert roles["dsv4-dsv4-operator-crd-reader"]["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}
    ]
    for rule in roles["dsv4-dsv4-operator"]["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"]  # never list or watch Secrets
        if "deepseekv4deployments" in rule["resources"]:
            assert not {"create", "delete", "update"} & set(rule["verbs"])


def test_watch_namespaces_use_namespaced_roles_only(k8s_cluster: KubeCluster) -> None:
    docs = _render(k8s_cluster, "watchNamespaces={team-a,team-b}")
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    # Only the read-only CRD watch kopf needs is cluster-wide.
    assert [r["metadata"]["name"] for r in cluster_roles] == ["dsv4-dsv4-operator-crd-reader"]
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role") == ["team-a", "team-b"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSV4_WATCH_NAMESPACES"] == "team-a,team-b"
