"""Fixtures for tests that need the real Kubernetes control plane (see tests/cluster/README.md)."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator

import pytest

from tests.cluster.control_plane import ControlPlaneError, KubeCluster

_CLUSTER_FIXTURE = "k8s_cluster"


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """One control plane for the whole session; component logs stay under pytest's temp folder.

    Fails (never skips) when the binaries are missing: `make cluster-binaries` builds them.
    """
    workdir = tmp_path_factory.mktemp("k8s")
    try:
        cluster = KubeCluster.start(workdir)
    except ControlPlaneError as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    print(f"\nk8s control plane up in {cluster.start_seconds:.1f}s at {cluster.server}; logs in {cluster.log_dir}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_namespace(k8s_cluster: KubeCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the component logs' tails to the report of any failed test that used the cluster."""
    report = yield
    if report.failed and _CLUSTER_FIXTURE in getattr(item, "fixturenames", ()):
        cluster = getattr(item, "funcargs", {}).get(_CLUSTER_FIXTURE)
        if isinstance(cluster, KubeCluster):
            report.sections.append(("k8s component logs", cluster.log_tails()))
    return report
