"""Spec updates roll only the affected pool; the API server rejects invalid specs with clear messages; problems
only the operator can see become a Degraded condition; a restart mid-reconcile converges with no duplicates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsv4.operator import builders, ownership
from dsv4.operator.ownership import Owner
from dsv4.operator.spec import parse_spec
from tests.cluster.control_plane import KubeCluster
from tests.cluster.operator.conftest import IMAGE, OperatorProcess
from tests.cluster.operator.helpers import get_json, wait_until
from tests.cluster.operator.test_examples import apply, children, expected_children, wait_ready

pytestmark = pytest.mark.cluster

INVALID: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "unit" / "operator" / "invalid_specs.yaml").read_text()
)


def resource(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "dsv4.io/v1alpha1", "kind": "DeepSeekV4Deployment", "metadata": {"name": name}, "spec": spec}


TINY = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}


def _generations(cluster: KubeCluster, namespace: str, name: str) -> dict[str, int]:
    return {
        role: get_json(cluster, "deployment", f"{name}-{role}", "-n", namespace)["metadata"]["generation"]
        for role in ("gateway", "prefill", "decode")
    }


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_api_server_rejects_invalid_spec(k8s_cluster: KubeCluster, chart_installed: str, case: dict[str, Any]) -> None:
    doc = resource(case.get("name", "bad"), case["spec"])
    done = k8s_cluster.kubectl(
        "create", "--dry-run=server", "-n", "default", "-f", "-", input=yaml.safe_dump(doc), check=False
    )
    assert done.returncode != 0, f"{case['id']} was admitted"
    assert case["message"] in done.stderr, done.stderr


def test_spec_update_rolls_only_the_affected_pool(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess
) -> None:
    apply(k8s_cluster, k8s_namespace, resource("roll", TINY))
    wait_ready(k8s_cluster, k8s_namespace, "roll")
    before = _generations(k8s_cluster, k8s_namespace, "roll")
    patch = {"spec": {"prefill": {"resources": {"requests": {"cpu": "250m"}}}}}
    k8s_cluster.kubectl("patch", "dsv4", "roll", "-n", k8s_namespace, "--type=merge", "-p", json.dumps(patch))
    wait_until(
        "prefill rolled",
        lambda: _generations(k8s_cluster, k8s_namespace, "roll")["prefill"] > before["prefill"],
    )
    obj = wait_ready(k8s_cluster, k8s_namespace, "roll")
    after = _generations(k8s_cluster, k8s_namespace, "roll")
    assert after["gateway"] == before["gateway"] and after["decode"] == before["decode"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    prefill = get_json(k8s_cluster, "deployment", "roll-prefill", "-n", k8s_namespace)
    assert prefill["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "250m"


def test_missing_secret_is_degraded_not_a_crash(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess
) -> None:
    spec = {**TINY, "auth": {"apiKeySecretRef": {"name": "nope", "key": "keys"}}}
    apply(k8s_cluster, k8s_namespace, resource("nokeys", spec))

    def degraded() -> dict[str, Any] | None:
        status = get_json(k8s_cluster, "dsv4", "nokeys", "-n", k8s_namespace).get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions", [])}
        return conds if conds.get("Degraded", {}).get("reason") == "SecretNotFound" else None

    conds = wait_until("Degraded/SecretNotFound", degraded)
    assert "Secret 'nope' does not exist" in conds["Degraded"]["message"]
    assert conds["Ready"]["status"] == "False"
    # Creating the Secret heals it without any restart.
    k8s_cluster.kubectl("create", "secret", "generic", "nope", "--from-literal=keys=k", "-n", k8s_namespace)
    k8s_cluster.kubectl("annotate", "dsv4", "nokeys", "-n", k8s_namespace, "touch=1")  # no spec change: resync
    wait_ready(k8s_cluster, k8s_namespace, "nokeys", timeout=150)
    assert running_operator.alive()


def test_restart_mid_reconcile_converges_without_duplicates(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess
) -> None:
    names = [f"r{i}" for i in range(4)]
    running_operator.kill()
    apply(k8s_cluster, k8s_namespace, *(resource(n, TINY) for n in names))
    # What a pass killed half-way leaves behind: some children applied by the operator's field manager, the rest
    # missing, and none of kopf's bookkeeping annotations. (A kill timed by polling lands after the whole pass.)
    for i, n in enumerate(names):
        uid = get_json(k8s_cluster, "dsv4", n, "-n", k8s_namespace)["metadata"]["uid"]
        spec = parse_spec(get_json(k8s_cluster, "dsv4", n, "-n", k8s_namespace)["spec"])
        done = builders.children(Owner(n, k8s_namespace, uid), spec, IMAGE)[: 3 * i + 1]
        k8s_cluster.kubectl(
            "apply",
            "--server-side",
            f"--field-manager={ownership.MANAGER}",
            "-n",
            k8s_namespace,
            "-f",
            "-",
            input=yaml.safe_dump_all(done),
        )
    partial = sum(len(children(k8s_cluster, k8s_namespace, n)) for n in names)
    assert 0 < partial < len(names) * len(expected_children("x", managed_redis=True))
    running_operator.start()
    for n in names:
        # Converged: the restarted operator completed the pass (every child, status written for this generation).
        wait_until(
            f"{n} children", lambda n=n: children(k8s_cluster, k8s_namespace, n) == expected_children(n, True), 120
        )
        wait_until(
            f"{n} status",
            lambda n=n: (
                (get_json(k8s_cluster, "dsv4", n, "-n", k8s_namespace).get("status") or {}).get("observedGeneration")
                == 1
            ),
            120,
        )
    for n in names:
        wait_until(
            f"{n} pods",
            lambda n=n: (
                len(
                    get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", f"app.kubernetes.io/instance={n}")["items"]
                )
                == 4
            ),
            120,
        )
        rs = get_json(k8s_cluster, "replicasets", "-n", k8s_namespace, "-l", f"app.kubernetes.io/instance={n}")
        assert len(rs["items"]) == 3  # one per Deployment: no second rollout, no duplicate
        pods = get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", f"app.kubernetes.io/instance={n}")
        assert len(pods["items"]) == 4  # gateway, prefill, decode, redis


def test_service_monitor_appears_with_its_crd(
    k8s_cluster: KubeCluster, k8s_namespace: str, running_operator: OperatorProcess
) -> None:
    crd = Path(__file__).resolve().parents[1] / "testdata" / "servicemonitor-crd.yaml"
    apply(k8s_cluster, k8s_namespace, resource("mon", TINY))
    wait_ready(k8s_cluster, k8s_namespace, "mon")
    assert "servicemonitor" not in {kind.lower() for kind, _ in children(k8s_cluster, k8s_namespace, "mon")}
    k8s_cluster.kubectl("apply", "-f", str(crd))
    try:
        # A running operator sees the new API within kube.APIS_TTL_S and applies the monitor at its next resync;
        # restarted, it does so at once (its resume pass).
        running_operator.stop()
        running_operator.start()
        monitor = wait_until(
            "the ServiceMonitor",
            lambda: get_json(k8s_cluster, "servicemonitors", "-n", k8s_namespace)["items"],
            90,
        )[0]
        assert monitor["metadata"]["name"] == "mon-metrics"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = get_json(
            k8s_cluster, "services", "-n", k8s_namespace, "-l", ",".join(f"{k}={v}" for k, v in selector.items())
        )
        assert sorted(s["metadata"]["name"] for s in services["items"]) == ["mon-decode", "mon-gateway", "mon-prefill"]
        pods = get_json(k8s_cluster, "pods", "-n", k8s_namespace, "-l", "app.kubernetes.io/instance=mon")["items"]
        workers = [p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] != "redis"]
        assert workers and all(p["metadata"]["annotations"]["prometheus.io/scrape"] == "true" for p in workers)
    finally:
        k8s_cluster.kubectl("delete", "-f", str(crd), "--wait=true", check=False)
