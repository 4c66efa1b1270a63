"""`make demo-cluster`: the examples on a local control plane with simulated NVIDIA, Ascend and CPU node pools.

Starts the test control plane (tests/cluster; kwok nodes, no containers run), installs the Helm chart, runs
`dsv4 operator`, applies the four examples and prints `kubectl get dsv4` and the pods on their pools.
`--keep` leaves everything running until Ctrl-C and prints the KUBECONFIG to use.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.cluster is imported from the checkout

from tests.cluster.control_plane import KubeCluster  # noqa: E402

EXAMPLES = REPO / "examples"


def _weights(namespace: str, claim: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"demo-{claim}"},
            "spec": {
                "capacity": {"storage": "2Ti"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/models/{claim}"},
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
                "volumeName": f"demo-{claim}",
                "resources": {"requests": {"storage": "2Ti"}},
            },
        },
    ]


def _secret(name: str, key: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {key: value}}


def _examples() -> list[dict[str, Any]]:
    docs = [yaml.safe_load((EXAMPLES / f"{n}.yaml").read_text()) for n in ("tiny-cpu", "flash-h200", "pro-h200")]
    pro = copy.deepcopy(yaml.safe_load((EXAMPLES / "pro-ascend-910c.yaml").read_text()))
    # The simulated Atlas A3 pool has two super pods of three nodes: one prefill pod and one decode group of two.
    pro["spec"]["decode"]["replicas"] = 1
    return [*docs, pro]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dsv4-demo-"))
    print(f"starting the control plane in {workdir} ...", flush=True)
    cluster = KubeCluster.start(workdir)
    operator: subprocess.Popen[bytes] | None = None
    try:
        print(f"up in {cluster.start_seconds:.1f}s; installing the chart", flush=True)
        cluster.helm(
            "install",
            "dsv4",
            str(REPO / "charts" / "dsv4-operator"),
            "-n",
            "dsv4-system",
            "--create-namespace",
            "--wait",
            "--timeout",
            "90s",
        )
        env = {**cluster.env, "DSV4_IMAGE": "ghcr.io/dsv4/dsv4:0.1.0"}
        with (workdir / "operator.log").open("wb") as log:
            operator = subprocess.Popen(
                [str(Path(sys.executable).parent / "dsv4"), "operator", "--all-namespaces"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        prerequisites = [
            *_weights("default", "deepseek-v4-flash"),
            *_weights("default", "deepseek-v4-pro"),
            _secret("dsv4-redis", "password", "demo"),
            _secret("dsv4-api-keys", "keys", "sk-demo"),
        ]
        cluster.kubectl("apply", "-n", "default", "-f", "-", input=yaml.safe_dump_all(prerequisites))
        cluster.kubectl("apply", "-n", "default", "-f", "-", input=yaml.safe_dump_all(_examples()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            phases = cluster.kubectl("get", "dsv4", "-o", "jsonpath={.items[*].status.phase}").stdout.split()
            if phases.count("Ready") == 4:
                break
            time.sleep(1)
        print(cluster.kubectl("get", "dsv4").stdout)
        print(cluster.kubectl("get", "pods", "-o", "wide", "--sort-by=.spec.nodeName").stdout)
        if args.keep:
            print(f"export KUBECONFIG={cluster.kubeconfig}   # Ctrl-C stops everything")
            while operator.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=20)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
