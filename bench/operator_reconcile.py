"""Operator reconcile latency on the real control plane: CR apply → every child created.

    .venv/bin/python bench/operator_reconcile.py [--single 7] [--burst 50] [--baseline-checkout DIR]

Starts the test control plane (tests/cluster, binaries from `make cluster-binaries`), installs the CRD, runs
`dsv4 operator` as a subprocess, then measures (a) `--single` CRs applied one at a time: seconds from `kubectl
apply` returning to all 12 children existing, p50 and max; (b) `--burst` CRs applied in one `kubectl apply`:
seconds until every CR has all its children, and the operator's CPU seconds meanwhile. Baselines in the same run:
one CR's children and then all `--burst` CRs' children applied directly with one `kubectl apply --server-side`
(what the operator saves a user from writing; the second is the API server's own floor for the burst). With
`--baseline-checkout DIR` (another checkout of this repository with its own `.venv`, e.g. main), that version's
operator and CRD first run the same burst on the same control plane, and its time is reported next to this one's.
Prints JSON lines, with the load average at the start (the machine is shared: compare numbers of one run only).
"""

from __future__ import annotations

import argparse
import json
import os
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
from dsv4.operator.kube import CHILD_KINDS  # noqa: E402
from dsv4.operator.ownership import Owner  # noqa: E402
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


def _direct(namespace: str, names: list[str]) -> list[dict[str, Any]]:
    """The children of CRs `names`, without owner references, for kubectl to apply directly."""
    out = []
    for name in names:
        for child in builders.children(Owner(name, namespace, "uid"), parse_spec(SPEC), "img"):
            child["metadata"].pop("ownerReferences")
            out.append(child)
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed_apply(cluster: KubeCluster, namespace: str, docs: list[dict[str, Any]], server_side: bool = False) -> float:
    start = time.monotonic()
    args = ["apply", "-n", namespace, "-f", "-"] + (["--server-side"] if server_side else [])
    cluster.kubectl(*args, input=yaml.safe_dump_all(docs))
    return time.monotonic() - start


class Operator:
    """`dsv4 operator` (the given entry point) as a subprocess, with its version's CRD installed first."""

    def __init__(self, cluster: KubeCluster, dsv4: Path, crd_text: str, log: Path) -> None:
        cluster.kubectl("apply", "-f", "-", input=crd_text)
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd.api.CRD_NAME}", "--timeout=60s")
        # Another checkout is only read: no bytecode is written into it.
        env = {**cluster.env, "DSV4_IMAGE": "registry.invalid/dsv4:bench", "PYTHONDONTWRITEBYTECODE": "1"}
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [str(dsv4), "operator", "--all-namespaces"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def _burst(
    cluster: KubeCluster, dyn: DynamicClient, op: Operator, namespace: str, n: int, per: int
) -> tuple[float, float, list[str]]:
    """Seconds from applying `n` CRs at once until all have their children, and the operator's CPU seconds."""
    cluster.kubectl("create", "namespace", namespace)
    names = [f"b{i}" for i in range(n)]
    cpu0 = _cpu_seconds(op.proc.pid)
    apply_s = _timed_apply(cluster, namespace, [_resource(name) for name in names])
    total = apply_s + _wait_children(dyn, namespace, names, per)
    return total, _cpu_seconds(op.proc.pid) - cpu0, names


def _warm_up(cluster: KubeCluster, dyn: DynamicClient, namespace: str, per: int) -> None:
    cluster.kubectl("create", "namespace", namespace)
    _timed_apply(cluster, namespace, [_resource("warmup")])
    _wait_children(dyn, namespace, ["warmup"], per, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=7, help="CRs applied one at a time (p50)")
    parser.add_argument("--burst", type=int, default=50, help="CRs applied at once (total)")
    parser.add_argument("--baseline-checkout", type=Path, help="another checkout (with .venv) to run the burst first")
    args = parser.parse_args()
    per = len(builders.children(Owner("x", "ns", "uid"), parse_spec(SPEC), "img"))
    load = round(os.getloadavg()[0], 2)
    common = {"bench": "operator_reconcile", "children_per_cr": per, "load_avg_1m": load}
    baseline_op: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = KubeCluster.start(Path(tmp))
        try:
            dyn = DynamicClient(cluster.api_client())
            if args.baseline_checkout is not None:
                checkout = args.baseline_checkout.resolve()
                crd_file = checkout / "charts" / "dsv4-operator" / "crds" / f"{crd.api.CRD_NAME}.yaml"
                dsv4 = checkout / ".venv" / "bin" / "dsv4"
                op = Operator(cluster, dsv4, crd_file.read_text(), Path(tmp) / "baseline-operator.log")
                try:
                    _warm_up(cluster, dyn, "bench-base-warmup", per)
                    seconds, cpu, _ = _burst(cluster, dyn, op, "bench-base-burst", args.burst, per)
                    baseline_op = {"baseline_operator_s": round(seconds, 3), "baseline_operator_cpu_s": round(cpu, 2)}
                    # Gone before this version runs, so it meets the same cluster (and the old finalizers are removed).
                    cluster.kubectl("delete", "dsv4", "--all", "-A", "--wait=true", timeout=300)
                    for ns in ("bench-base-warmup", "bench-base-burst"):
                        cluster.kubectl("delete", "namespace", ns, "--wait=true", timeout=300)
                finally:
                    op.stop()
            op = Operator(cluster, Path(sys.executable).parent / "dsv4", crd.render(), Path(tmp) / "operator.log")
            try:
                _warm_up(cluster, dyn, "bench-single", per)
                singles = []
                for i in range(args.single):
                    name = f"s{i}"
                    apply_s = _timed_apply(cluster, "bench-single", [_resource(name)])
                    singles.append(apply_s + _wait_children(dyn, "bench-single", [name], per))
                burst, burst_cpu, names = _burst(cluster, dyn, op, "bench-burst", args.burst, per)
            finally:
                op.stop()
            # Baselines: the same children written directly by kubectl (no operator), one CR's worth, then the burst's.
            for ns in ("bench-baseline", "bench-baseline-burst"):
                cluster.kubectl("create", "namespace", ns)
            baseline = _timed_apply(cluster, "bench-baseline", _direct("bench-baseline", ["direct"]), server_side=True)
            burst_baseline = _timed_apply(
                cluster, "bench-baseline-burst", _direct("bench-baseline-burst", names), server_side=True
            )
        finally:
            cluster.stop()
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
                "operator_cpu_s": round(burst_cpu, 2),
                **baseline_op,
                "baseline_kubectl_apply_s": round(burst_baseline, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
