"""The operator as a user runs it: the chart installed with helm, `dsv4 operator` running with the chart's
ServiceAccount token (so the chart's RBAC is what is tested), against the real control plane."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.control_plane import KubeCluster

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "dsv4-operator"
RELEASE = "dsv4"
SYSTEM_NS = "dsv4-system"
IMAGE = "registry.invalid/dsv4/dsv4:test"


class OperatorProcess:
    """`dsv4 operator --all-namespaces` as a subprocess; its log is kept for failure reports."""

    def __init__(self, cluster: KubeCluster, kubeconfig: Path, log: Path) -> None:
        self.cluster, self.kubeconfig, self.log = cluster, kubeconfig, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {
            **self.cluster.env,
            "KUBECONFIG": str(self.kubeconfig),
            "DSV4_IMAGE": IMAGE,
            "DSV4_OPERATOR_VERBOSE": "1",
        }
        dsv4 = Path(sys.executable).parent / "dsv4"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(dsv4), "operator", "--all-namespaces"], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no cleanup, as an OOM kill or a node loss would do."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 400) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def _service_account_kubeconfig(cluster: KubeCluster, path: Path) -> Path:
    token = cluster.kubectl("create", "token", RELEASE + "-dsv4-operator", "-n", SYSTEM_NS, "--duration=2h").stdout
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    cluster_entry = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster_entry],
        "users": [{"name": "operator", "user": {"token": token.strip()}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster_entry["name"], "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def chart_installed(k8s_cluster: KubeCluster) -> Iterator[str]:
    """`helm install` of the chart (CRD, RBAC, operator Deployment); uninstalled at the end."""
    k8s_cluster.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        f"image.repository={IMAGE.rsplit(':', 1)[0]}",
        "--set",
        "image.tag=test",
        "--wait",
        "--timeout",
        "90s",
    )
    yield RELEASE
    k8s_cluster.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, check=False)


@pytest.fixture(scope="session")
def operator(
    k8s_cluster: KubeCluster, chart_installed: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, running for the whole session under the chart's ServiceAccount."""
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = _service_account_kubeconfig(k8s_cluster, workdir / "kubeconfig")
    proc = OperatorProcess(k8s_cluster, kubeconfig, workdir / "operator.log")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def running_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session's operator; the test fails if the operator died during it (a crash, not a Degraded status)."""
    if not operator.alive():
        operator.start()
    yield operator
    assert operator.alive(), f"the operator exited during the test:\n{operator.tail()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        op = getattr(item, "funcargs", {}).get("running_operator")
        if isinstance(op, OperatorProcess):
            report.sections.append(("operator log", op.tail()))
    return report
