"""The test control plane behaves like a real cluster in the ways the operator depends on: scheduling onto
accelerator pools through kwok, CRD schema and CEL validation, owner-reference garbage collection, server-side
apply conflicts, and helm install/uninstall."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.control_plane import CommandError, ControlPlaneError, KubeCluster
from tests.cluster.node_pools import ASCEND_POOL, NVIDIA_POOL, POOL_LABEL, NodePool

pytestmark = pytest.mark.cluster

TESTDATA = Path(__file__).parent / "testdata"


def _accelerator_deployment(name: str, pool: NodePool, tolerate: bool = True) -> dict[str, Any]:
    assert pool.accelerator_resource is not None
    resources = {pool.accelerator_resource: "2"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "tolerations": pool.tolerations() if tolerate else [],
                    # Two Ascend pools (910B, 910C) offer the same resource: the pool label picks one.
                    "nodeSelector": {POOL_LABEL: pool.name},
                    "containers": [
                        {
                            "name": "worker",
                            "image": "registry.invalid/dsv4/worker:0",
                            "resources": {"limits": resources, "requests": resources},
                        }
                    ],
                },
            },
        },
    }


def _pods(cluster: KubeCluster, namespace: str, app: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


@pytest.mark.parametrize("pool", [NVIDIA_POOL, ASCEND_POOL], ids=lambda p: p.name)
def test_accelerator_deployment_runs_on_its_pool(k8s_cluster: KubeCluster, k8s_namespace: str, pool: NodePool) -> None:
    name = f"{pool.name}-worker"
    k8s_cluster.kubectl(
        "apply", "-n", k8s_namespace, "-f", "-", input=yaml.safe_dump(_accelerator_deployment(name, pool))
    )
    k8s_cluster.kubectl("rollout", "status", "-n", k8s_namespace, f"deployment/{name}", "--timeout=60s")

    pods = _pods(k8s_cluster, k8s_namespace, name)
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] in pool.node_names
        node = json.loads(k8s_cluster.kubectl("get", "node", pod["spec"]["nodeName"], "-o", "json").stdout)
        assert node["metadata"]["labels"][POOL_LABEL] == pool.name
        for key, value in pool.labels.items():
            assert node["metadata"]["labels"][key] == value
        assert node["status"]["allocatable"][pool.accelerator_resource] == "8"


def test_accelerator_pod_without_toleration_is_unschedulable(k8s_cluster: KubeCluster, k8s_namespace: str) -> None:
    name = "untolerated"
    manifest = _accelerator_deployment(name, NVIDIA_POOL, tolerate=False)
    del manifest["spec"]["template"]["spec"]["nodeSelector"]  # only the taint keeps it off the GPU nodes
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", "-", input=yaml.safe_dump(manifest))

    def unschedulable_message() -> str:
        for pod in _pods(k8s_cluster, k8s_namespace, name):
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return str(cond.get("message", ""))
        return ""

    k8s_cluster.wait_for("the scheduler to report the pod Unschedulable", lambda: bool(unschedulable_message()), 30)
    message = unschedulable_message()
    assert "untolerated taint" in message and "nvidia.com/gpu" in message, message
    assert all(pod["spec"].get("nodeName") is None for pod in _pods(k8s_cluster, k8s_namespace, name))


@pytest.fixture(scope="module")
def widgets_crd(k8s_cluster: KubeCluster) -> Iterator[str]:
    crd = TESTDATA / "widgets-crd.yaml"
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(crd))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.test.dsv4.io", "--timeout=30s")
    yield "widgets.test.dsv4.io"
    k8s_cluster.kubectl("delete", "-f", str(crd), "--wait=false", check=False)


def _widget(name: str, **spec: Any) -> str:
    return yaml.safe_dump({"apiVersion": "test.dsv4.io/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec})


def _rejected(cluster: KubeCluster, namespace: str, manifest: str, *verb: str) -> str:
    """stderr of a `kubectl create` (or `verb`) that the API server must refuse."""
    result = cluster.kubectl(*(verb or ("create",)), "-n", namespace, "-f", "-", input=manifest, check=False)
    assert result.returncode != 0, f"the API server accepted an invalid object:\n{manifest}"
    return result.stderr


def test_crd_structural_schema_rejects_invalid_objects(
    k8s_cluster: KubeCluster, k8s_namespace: str, widgets_crd: str
) -> None:
    err = _rejected(k8s_cluster, k8s_namespace, _widget("bad-enum", accelerator="tpu"))
    assert 'spec.accelerator: Unsupported value: "tpu": supported values: "nvidia", "ascend", "cpu"' in err

    bad_type = _widget("bad-type", accelerator="cpu", maxReplicas="three")
    err = _rejected(k8s_cluster, k8s_namespace, bad_type)
    assert 'spec.maxReplicas: Invalid value: "string": spec.maxReplicas in body must be of type integer' in err
    # Server-side apply (what the operator uses) refuses the same object earlier, when it builds the typed patch.
    err = _rejected(k8s_cluster, k8s_namespace, bad_type, "apply", "--server-side")
    assert ".spec.maxReplicas: expected numeric (int or float), got string" in err

    err = _rejected(k8s_cluster, k8s_namespace, _widget("negative", accelerator="cpu", minReplicas=-1))
    assert "spec.minReplicas: Invalid value: -1: spec.minReplicas in body should be greater than or equal to 0" in err

    err = _rejected(k8s_cluster, k8s_namespace, _widget("missing", minReplicas=1))
    assert "spec.accelerator: Required value" in err

    # kubectl asks for strict field validation: a field the schema does not know is an error ...
    err = _rejected(k8s_cluster, k8s_namespace, _widget("good", accelerator="nvidia", colour="red"))
    assert 'strict decoding error: unknown field "spec.colour"' in err
    # ... and without it the object is stored pruned of that field, with the schema's defaults filled in.
    k8s_cluster.kubectl(
        "apply",
        "--validate=false",
        "-n",
        k8s_namespace,
        "-f",
        "-",
        input=_widget("good", accelerator="nvidia", colour="red"),
    )
    stored = json.loads(k8s_cluster.kubectl("get", "widget", "good", "-n", k8s_namespace, "-o", "json").stdout)
    assert stored["spec"] == {"accelerator": "nvidia", "minReplicas": 1, "maxReplicas": 4}


def test_crd_cel_rule_rejects_with_its_message(k8s_cluster: KubeCluster, k8s_namespace: str, widgets_crd: str) -> None:
    err = _rejected(k8s_cluster, k8s_namespace, _widget("inverted", accelerator="ascend", minReplicas=5, maxReplicas=2))
    assert "spec: Invalid value" in err and "minReplicas must not exceed maxReplicas" in err

    # The rule also sees defaults: minReplicas 6 against the default maxReplicas 4.
    err = _rejected(k8s_cluster, k8s_namespace, _widget("over-default", accelerator="ascend", minReplicas=6))
    assert "minReplicas must not exceed maxReplicas" in err


def test_deleting_owner_garbage_collects_children(k8s_cluster: KubeCluster, k8s_namespace: str) -> None:
    k8s_cluster.kubectl("create", "configmap", "owner", "-n", k8s_namespace, "--from-literal=role=owner")
    uid = k8s_cluster.kubectl("get", "configmap", "owner", "-n", k8s_namespace, "-o", "jsonpath={.metadata.uid}").stdout
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "blockOwnerDeletion": True}
    children = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap" if i % 2 == 0 else "Secret",
            "metadata": {"name": f"child-{i}", "ownerReferences": [owner_ref]},
            "data": {},
        }
        for i in range(4)
    ]
    k8s_cluster.kubectl("apply", "-n", k8s_namespace, "-f", "-", input=yaml.safe_dump_all(children))
    assert k8s_cluster.kubectl("get", "configmap,secret", "-n", k8s_namespace, "-o", "name").stdout.count("child-") == 4

    k8s_cluster.kubectl("delete", "configmap", "owner", "-n", k8s_namespace, "--cascade=foreground", "--wait=false")

    def children_gone() -> bool:
        names = k8s_cluster.kubectl("get", "configmap,secret", "-n", k8s_namespace, "-o", "name").stdout
        return "child-" not in names and "configmap/owner" not in names

    k8s_cluster.wait_for("the garbage collector to delete the owner's children", children_gone, 60)


def test_server_side_apply_reports_field_manager_conflicts(k8s_cluster: KubeCluster, k8s_namespace: str) -> None:
    def apply(manager: str, value: str, *extra: str) -> CommandError | None:
        manifest = yaml.safe_dump(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"k": value}}
        )
        try:
            k8s_cluster.kubectl("apply", "--server-side", f"--field-manager={manager}", "-n", k8s_namespace, "-f", "-",
                                *extra, input=manifest)  # fmt: skip
        except CommandError as exc:
            return exc
        return None

    assert apply("operator", "a") is None
    conflict = apply("someone-else", "b")
    assert conflict is not None and "conflict" in conflict.stderr.lower() and "operator" in conflict.stderr
    assert apply("someone-else", "b", "--force-conflicts") is None
    data = k8s_cluster.kubectl("get", "configmap", "ssa", "-n", k8s_namespace, "-o", "jsonpath={.data.k}").stdout
    assert data == "b"


def test_helm_install_and_uninstall(k8s_cluster: KubeCluster, k8s_namespace: str) -> None:
    chart = TESTDATA / "charts" / "smoke"
    k8s_cluster.helm("install", "smoke", str(chart), "-n", k8s_namespace, "--wait", "--timeout=60s")

    status = json.loads(k8s_cluster.helm("status", "smoke", "-n", k8s_namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    greeting = k8s_cluster.kubectl(
        "get", "configmap", "smoke-config", "-n", k8s_namespace, "-o", "jsonpath={.data.greeting}"
    ).stdout
    assert greeting == "hello from helm"
    pods = json.loads(
        k8s_cluster.kubectl(
            "get", "pods", "-n", k8s_namespace, "-l", "app.kubernetes.io/instance=smoke", "-o", "json"
        ).stdout
    )["items"]
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Running" and p["spec"]["nodeName"].startswith("cpu-") for p in pods)

    k8s_cluster.helm("uninstall", "smoke", "-n", k8s_namespace, "--wait", "--timeout=60s")
    assert k8s_cluster.helm("list", "-n", k8s_namespace, "-q").stdout.strip() == ""
    left = k8s_cluster.kubectl(
        "get", "deployment,configmap", "-n", k8s_namespace, "-l", "app.kubernetes.io/instance=smoke", "-o", "name"
    )
    assert left.stdout.strip() == ""


def test_missing_binaries_fail_with_the_build_command(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(ControlPlaneError, match=r"binaries missing .*etcd, kube-apiserver.*make cluster-binaries"):
        KubeCluster.start(tmp_path / "cluster", binaries=empty)
