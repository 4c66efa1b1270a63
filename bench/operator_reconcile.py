"""Operator reconcile latency on the real control plane: CR apply → every child created.

    .venv/bin/python bench/operator_reconcile.py [--single 7] [--burst 50]

Starts the test control plane (tests/cluster, binaries from `make cluster-binaries`), installs the CRD, runs
`dsv4 operator` as a subprocess, then measures (a) `--single` CRs applied one at a time: seconds from `kubectl
apply` returning to all 12 children existing, p50 and max; (b) `--burst` CRs applied in one `kubectl apply`:
seconds until every CR has all its children. Baseline in the same run: the same objects applied directly with
`kubectl apply --server-side` (what the operator saves a user from writing). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes.dynamic import DynamicClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.cluster is not installed; it is imported from the checkout

from dsv4.operator import builders, crd  # noqa: E402
from dsv4.operator.builders import Owner  # noqa: E402
from dsv4.operator.kube import CHILD_KINDS  # noqa: E402
from dsv4.operator.spec import parse_spec  # noqa: E402
from tests.cluster.control_plane import KubeCluster  # noqa: E402

SPEC = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}


def _resource(name: str) -> dict[str, Any]:
    return {"apiVersion": "dsv4.io/v1alpha1", "kind": "DeepSeekV4Deployment", "metadata": {"name": name}, "spec": SPEC}


def _child_counts(dyn: DynamicClient, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for api_version, kind in CHILD_KINDS:
        items = dyn.get(dyn.resources.get(api_version=api_version, kind=kind), namespace=namespace).items
        for item in items:
            inst = (item.metadata.labels or {}).get("app.kubernetes.io/instance")
            if inst:
                counts[inst] = counts.get(inst, 0) + 1
    return counts


def _wait_children(dyn: DynamicClient, namespace: str, names: list[str], per: int, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        counts = _child_counts(dyn, namespace)
        if all(counts.get(n, 0) >= per for n in names):
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"children of {len(names)} CRs not created within {timeout}s")


def _timed_apply(cluster: KubeCluster, namespace: str, docs: list[dict[str, Any]], server_side: bool = False) -> float:
    start = time.monotonic()
    args = ["apply", "-n", namespace, "-f", "-"] + (["--server-side"] if server_side else [])
    cluster.kubectl(*args, input=yaml.safe_dump_all(docs))
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=7, help="CRs applied one at a time (p50)")
    parser.add_argument("--burst", type=int, default=50, help="CRs applied at once (total)")
    args = parser.parse_args()
    per = len(builders.children(Owner("x", "ns", "uid"), parse_spec(SPEC), "img"))
    with tempfile.TemporaryDirectory() as tmp:
        cluster = KubeCluster.start(Path(tmp))
        operator: subprocess.Popen[bytes] | None = None
        try:
            cluster.kubectl("apply", "-f", "-", input=crd.render())
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd.api.CRD_NAME}", "--timeout=60s")
            env = {**cluster.env, "DSV4_IMAGE": "registry.invalid/dsv4:bench"}
            log = (Path(tmp) / "operator.log").open("wb")
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "dsv4"), "operator", "--all-namespaces"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            dyn = DynamicClient(cluster.api_client())
            cluster.kubectl("create", "namespace", "bench-single")
            cluster.kubectl("create", "namespace", "bench-burst")
            cluster.kubectl("create", "namespace", "bench-baseline")
            _timed_apply(cluster, "bench-single", [_resource("warmup")])
            _wait_children(dyn, "bench-single", ["warmup"], per, timeout=120)

            singles = []
            for i in range(args.single):
                name = f"s{i}"
                apply_s = _timed_apply(cluster, "bench-single", [_resource(name)])
                singles.append(apply_s + _wait_children(dyn, "bench-single", [name], per))
            names = [f"b{i}" for i in range(args.burst)]
            apply_s = _timed_apply(cluster, "bench-burst", [_resource(n) for n in names])
            burst = apply_s + _wait_children(dyn, "bench-burst", names, per)

            # Baseline: the same children written directly by kubectl (no operator), one CR's worth.
            direct = builders.children(Owner("direct", "bench-baseline", "uid"), parse_spec(SPEC), "img")
            for child in direct:
                child["metadata"].pop("ownerReferences")
            baseline = _timed_apply(cluster, "bench-baseline", direct, server_side=True)
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(timeout=20)
            cluster.stop()
    common = {"bench": "operator_reconcile", "children_per_cr": per}
    print(
        json.dumps(
            {
                **common,
                "case": "single_cr",
                "n": len(singles),
                "p50_s": round(statistics.median(singles), 3),
                "max_s": round(max(singles), 3),
                "baseline_kubectl_apply_s": round(baseline, 3),
            }
        )
    )
    print(
        json.dumps(
            {
                **common,
                "case": "burst",
                "n": args.burst,
                "total_s": round(burst, 3),
                "per_cr_s": round(burst / args.burst, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
