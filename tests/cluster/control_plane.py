"""A real Kubernetes control plane on loopback for the cluster tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (simulated GPU, Ascend and CPU nodes); on request
(`start_lws`) the LeaderWorkerSet controller with its CRD and admission webhooks.

The binaries come from `tests/cluster/build.sh` (`make cluster-binaries`); nothing here is a mock. See
tests/cluster/README.md for the API the operator tests use.
"""

from __future__ import annotations

import base64
import ctypes
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from dsv4.services.local_redis import free_port
from tests.cluster.node_pools import (
    ASCEND_A3_POOL,
    ASCEND_POOL,
    CPU_POOL,
    KWOK_ANNOTATION,
    NODE_POOLS,
    NVIDIA_POOL,
    NodePool,
)
from tests.cluster.pki import (
    SERVICE_ACCOUNT_ISSUER,
    SERVICE_CLUSTER_IP_RANGE,
    CertPair,
    Pki,
    write_kubeconfig,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "cluster" / "build.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm", "lws-controller")
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"
LWS_CRDS = (LWS_CRD, "disaggregatedsets.disaggregatedset.x-k8s.io")
LWS_WEBHOOKS = "dsv4-test-lws"  # name of the mutating and the validating webhook configuration
START_TIMEOUT_S = 120.0
_NODE_READY_JSONPATH = (
    'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
)


class ControlPlaneError(RuntimeError):
    """A component is missing, did not start, or died; the message carries the component logs' tails."""


class CommandError(subprocess.CalledProcessError):
    """kubectl or helm failed; unlike its base class, the message includes the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr.strip() if self.stderr else ''}"


def bin_dir() -> Path:
    """The cache folder build.sh fills (it derives the Kubernetes version from the pinned go.mod)."""
    out = subprocess.run([str(BUILD_SCRIPT), "--print-bin-dir"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} --print-bin-dir failed: {out.stderr.strip()}")
    return Path(out.stdout.strip())


def missing_binaries(directory: Path) -> list[str]:
    """Components that build.sh has not (yet) put into `directory`."""
    return [name for name in COMPONENTS if not os.access(directory / name, os.X_OK)]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if pytest is killed outright, the kernel kills the component
    # too instead of leaving an apiserver holding ports and an etcd data dir.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class _Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass(repr=False)
class KubeCluster:
    """A running test cluster. Create with `KubeCluster.start(workdir)`, end with `stop()`.

    Attributes operator tests use: `kubeconfig` (admin, system:masters), `server` (https URL), `bin_dir`,
    `log_dir`, `env` (environment for child processes: KUBECONFIG and PATH with the built binaries),
    `pools` / `NVIDIA_POOL` / `ASCEND_POOL` / `ASCEND_A3_POOL` / `CPU_POOL` (node pool names, labels, taints,
    resources). `start_lws()` / `stop_lws()` install and remove the LeaderWorkerSet API.
    """

    workdir: Path
    bin_dir: Path
    server: str
    kubeconfig: Path
    pki: Pki
    start_seconds: float = 0.0
    _scheduler_port: int = 0
    _components: list[_Component] = field(default_factory=list)
    _lws: _Component | None = None

    pools: tuple[NodePool, ...] = NODE_POOLS
    NVIDIA_POOL = NVIDIA_POOL
    ASCEND_POOL = ASCEND_POOL
    ASCEND_A3_POOL = ASCEND_A3_POOL
    CPU_POOL = CPU_POOL

    def __repr__(self) -> str:
        return f"KubeCluster(server={self.server!r}, workdir={str(self.workdir)!r})"

    @property
    def log_dir(self) -> Path:
        """Folder holding one `<component>.log` per process; kept after the session for post-mortems."""
        return self.workdir / "logs"

    @property
    def kubectl_binary(self) -> str:
        """The kubectl used by `kubectl()`: build.sh's when it built one, else the machine's."""
        built = self.bin_dir / "kubectl"
        found = str(built) if built.exists() else shutil.which("kubectl")
        if found is None:
            raise ControlPlaneError("no kubectl: run `make cluster-binaries`, which builds one when none is installed")
        return found

    @property
    def env(self) -> dict[str, str]:
        """Environment for processes that talk to the cluster (the operator, kubectl, helm)."""
        home = self.workdir / "home"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "KUBECACHEDIR": str(home / "kube-cache"),
            "HELM_CACHE_HOME": str(home / "helm-cache"),
            "HELM_CONFIG_HOME": str(home / "helm-config"),
            "HELM_DATA_HOME": str(home / "helm-data"),
        }

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `kubectl ARGS` against the cluster; text output. With `check`, a non-zero exit raises
        `subprocess.CalledProcessError` whose message includes stderr."""
        return self._run([self.kubectl_binary, *args], input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `helm ARGS` against the cluster with private cache/config folders."""
        return self._run([str(self.bin_dir / "helm"), *args], input=None, check=check, timeout=timeout)

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new kubernetes-client ApiClient authenticated as the admin; close it (or use `with`) when done."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def log_tails(self, lines: int = 30) -> str:
        """The last `lines` lines of every component's log, for failure reports."""
        parts = [f"component logs in {self.log_dir}"]
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(parts)

    def _run(
        self, argv: Sequence[str], input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise CommandError(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    # ----- start and stop -----

    @classmethod
    def start(cls, workdir: Path, binaries: Path | None = None) -> KubeCluster:
        """Start every component under `workdir` and return once the API serves, the controllers and the
        scheduler run, and every kwok node is Ready. Raises ControlPlaneError (with log tails) otherwise."""
        t0 = time.monotonic()
        directory = binaries or bin_dir()
        missing = missing_binaries(directory)
        if missing:
            raise ControlPlaneError(
                f"control-plane binaries missing from {directory}: {', '.join(missing)}. "
                "Run `make cluster-binaries` (tests/cluster/build.sh) to build them."
            )
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
        pki = Pki.create(workdir / "pki")
        port = free_port()
        server = f"https://127.0.0.1:{port}"
        admin = pki.client("admin", "dsv4-test-admin", ("system:masters",))
        kubeconfig = write_kubeconfig(workdir / "admin.kubeconfig", server, pki.ca.cert, admin, "dsv4-test-admin")
        cluster = cls(workdir=workdir, bin_dir=directory, server=server, kubeconfig=kubeconfig, pki=pki)
        try:
            cluster._start_etcd_and_apiserver(port)
            cluster._start_controllers(admin)
            cluster._create_nodes()
            cluster._wait_until_usable()
        except BaseException:
            cluster.stop()
            raise
        cluster.start_seconds = time.monotonic() - t0
        return cluster

    def stop(self) -> None:
        """Terminate the components one by one, newest first (the apiserver hangs in shutdown if etcd goes
        first), killing any that ignores SIGTERM for 10 s."""
        for component in reversed(self._components):
            if component.proc.poll() is None:
                component.proc.terminate()
            try:
                component.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                component.proc.kill()
                component.proc.wait()
        self._components.clear()

    # ----- the LeaderWorkerSet API (optional) -----

    @property
    def lws_running(self) -> bool:
        """Whether `start_lws()` installed the LeaderWorkerSet API and its controller runs."""
        return self._lws is not None and self._lws.proc.poll() is None

    def start_lws(self) -> None:
        """Install the LeaderWorkerSet CRD and run its controller (the binary build.sh built from the pinned
        sigs.k8s.io/lws module) with its admission webhooks: they serve on loopback with a certificate of the cluster
        CA and are registered by URL, since no Service can reach a process outside the cluster. The pod webhook is
        what gives LWS pods their group labels and LWS_* env, so it is not optional."""
        if self.lws_running:
            return
        crds = self.bin_dir.parent / "share" / "lws-crds.yaml"
        if not crds.exists():
            raise ControlPlaneError(f"{crds} is missing: run `make cluster-binaries`")
        # Over a megabyte each: too large for client-side apply's last-applied annotation.
        self.kubectl("apply", "--server-side", "--field-manager=dsv4-test", "-f", str(crds), timeout=120)
        established = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        for name in LWS_CRDS:
            self.wait_for(
                f"CRD {name} to be established",
                lambda name=name: self.kubectl("get", "crd", name, "-o", established, check=False).stdout == "True",
            )
        cert = self.pki.server("lws-webhook")
        cert_dir = self.workdir / "lws-certs"
        cert_dir.mkdir(exist_ok=True)
        shutil.copyfile(cert.cert, cert_dir / "tls.crt")
        shutil.copyfile(cert.key, cert_dir / "tls.key")
        webhook_port, health_port = free_port(), free_port()
        config = {
            "apiVersion": "config.lws.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        }
        config_file = self.workdir / "lws-config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self._lws = self._spawn("lws-controller", f"--config={config_file}", f"--kubeconfig={self.kubeconfig}")
        self.wait_for("lws-controller /healthz", lambda: _http_get(f"http://127.0.0.1:{health_port}/healthz") == b"ok")
        hooks = _lws_webhooks(f"https://127.0.0.1:{webhook_port}", self.pki.ca.cert)
        self.kubectl("apply", "--server-side", "--field-manager=dsv4-test", "-f", "-", input=yaml.safe_dump_all(hooks))
        probe = f"https://127.0.0.1:{webhook_port}/healthz"
        # The webhook server answers (404 for this path) once its certificate is loaded.
        self.wait_for("the LWS webhook server", lambda: _tls_listening(probe, self.pki.ca.cert))

    def stop_lws(self) -> None:
        """Remove the webhooks and the CRD (with every LeaderWorkerSet), then stop the controller."""
        if self._lws is None:
            return
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            self.kubectl("delete", kind, LWS_WEBHOOKS, "--ignore-not-found", check=False)
        self.kubectl("delete", "crd", *LWS_CRDS, "--ignore-not-found", "--wait=true", timeout=120, check=False)
        component, self._lws = self._lws, None
        self._components.remove(component)
        component.proc.terminate()
        try:
            component.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            component.proc.kill()
            component.proc.wait()

    def _spawn(self, name: str, *args: str) -> _Component:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        component = _Component(name, proc, log)
        self._components.append(component)
        return component

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> None:
        """Poll `ready()` every 0.2 s until it is true; raise ControlPlaneError naming `what`, with the log
        tails, on timeout or as soon as any component process has died."""
        deadline = time.monotonic() + timeout
        while True:
            for component in self._components:
                if component.proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{component.name} exited with {component.proc.returncode} while waiting for {what}\n"
                        + self.log_tails()
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.log_tails())
            time.sleep(0.2)

    def _start_etcd_and_apiserver(self, apiserver_port: int) -> None:
        etcd_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        self._spawn(
            "etcd",
            "--name=dsv4-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=dsv4-test={peer_url}",
            # Throw-away data on a shared disk: fsync only slows the tests down.
            "--unsafe-no-fsync",
            "--log-level=warn",
        )
        self.wait_for("etcd /health", lambda: b'"health":"true"' in _http_get(f"{etcd_url}/health"))
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The endpoint reconciler refuses loopback addresses; nothing here reaches the API through its Service.
            "--endpoint-reconciler-type=none",
            f"--secure-port={apiserver_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.apiserver.cert}",
            f"--tls-private-key-file={pki.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--profiling=false",
        )
        ctx = self._admin_tls()
        self.wait_for("kube-apiserver /readyz", lambda: _http_get(f"{self.server}/readyz", ctx) == b"ok")

    def _start_controllers(self, admin: CertPair) -> None:
        pki = self.pki
        kcm_cert = pki.client("kube-controller-manager", "system:kube-controller-manager")
        kcm_config = write_kubeconfig(
            self.workdir / "kcm.kubeconfig", self.server, pki.ca.cert, kcm_cert, "system:kube-controller-manager"
        )
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # kwok renews node leases late when the 2 shared cores are busy; after the default 50 s grace the node
            # lifecycle controller marks the node unhealthy and sets every pod on it NotReady, and kwok's pod-ready
            # stage (Pending pods only) never makes them Ready again. Nodes here never really fail.
            "--node-monitor-grace-period=1h",
            "--profiling=false",
        )
        sched_cert = pki.client("kube-scheduler", "system:kube-scheduler")
        sched_config = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig", self.server, pki.ca.cert, sched_cert, "system:kube-scheduler"
        )
        self._scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={sched_config}",
            f"--authentication-kubeconfig={sched_config}",
            f"--authorization-kubeconfig={sched_config}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self._scheduler_port}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        )
        stages = self.bin_dir.parent / "share" / "kwok-stages.yaml"
        if not stages.exists():
            raise ControlPlaneError(f"{stages} is missing: run `make cluster-binaries`")
        self._spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{free_port()}",
            "--cidr=10.64.0.0/16",
            "--node-ip=10.63.0.1",
        )

    def _create_nodes(self) -> None:
        manifests = [pool.node_manifest(i) for pool in self.pools for i in range(pool.size)]
        self.kubectl("apply", "--server-side", "--field-manager=dsv4-test", "-f", "-",
                     input=yaml.safe_dump_all(manifests))  # fmt: skip

    def _wait_until_usable(self) -> None:
        ctx = self._admin_tls()
        expected = {name for pool in self.pools for name in pool.node_names}

        def nodes_ready() -> bool:
            out = self.kubectl(
                "get",
                "nodes",
                "-o",
                _NODE_READY_JSONPATH,
                check=False,
            )
            ready = {line.split("=")[0] for line in out.stdout.splitlines() if line.endswith("=True")}
            return expected <= ready

        def default_service_account() -> bool:
            return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

        scheduler_ready = f"https://127.0.0.1:{self._scheduler_port}/readyz"
        self.wait_for("kube-scheduler /readyz", lambda: _http_get(scheduler_ready, _insecure_tls()) == b"ok")
        self.wait_for("kwok to mark every node Ready", nodes_ready)
        self.wait_for("the default ServiceAccount (controller-manager running)", default_service_account)
        self.wait_for("kube-apiserver /readyz", lambda: _http_get(f"{self.server}/readyz", ctx) == b"ok")

    def _admin_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        admin = self.pki.root
        ctx.load_cert_chain(str(admin / "admin.crt"), str(admin / "admin.key"))
        return ctx


def _lws_webhooks(base_url: str, ca: Path) -> list[dict[str, Any]]:
    """LWS's webhook configurations (as its Helm chart declares them), pointing at `base_url`."""
    bundle = base64.b64encode(ca.read_bytes()).decode()
    only_lws_pods = {"matchExpressions": [{"key": "leaderworkerset.sigs.k8s.io/name", "operator": "Exists"}]}

    def hook(name: str, path: str, group: str, resources: str, ops: list[str], pods: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": base_url + path, "caBundle": bundle},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ops, "resources": [resources]}],
        }
        if pods:
            out["objectSelector"] = only_lws_pods
        return out

    lws = "leaderworkerset.x-k8s.io"
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": LWS_WEBHOOKS},
            "webhooks": [
                hook("mleaderworkerset.kb.io", "/mutate-leaderworkerset-x-k8s-io-v1-leaderworkerset", lws,
                     "leaderworkersets", ["CREATE", "UPDATE"], pods=False),
                hook("mpod.kb.io", "/mutate--v1-pod", "", "pods", ["CREATE"], pods=True),
            ],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": LWS_WEBHOOKS},
            "webhooks": [
                hook("vleaderworkerset.kb.io", "/validate-leaderworkerset-x-k8s-io-v1-leaderworkerset", lws,
                     "leaderworkersets", ["CREATE", "UPDATE"], pods=False),
                hook("vpod.kb.io", "/validate--v1-pod", "", "pods", ["CREATE", "UPDATE"], pods=True),
            ],
        },
    ]  # fmt: skip


def _tls_listening(url: str, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=ctx):
            return True
    except urllib.error.HTTPError:
        return True  # it answered over verified TLS
    except (urllib.error.URLError, OSError):
        return False


def _insecure_tls() -> ssl.SSLContext:
    # The scheduler serves /readyz with a self-signed certificate it made itself; only its health is asked.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _http_get(url: str, context: ssl.SSLContext | None = None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=context) as response:
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, OSError):
        return b""
