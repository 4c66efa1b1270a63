"""Run the pods the operator renders as local processes, container by container, as the kubelet would.

`expand(children)` turns the rendered workloads (Deployments, StatefulSets, LeaderWorkerSets) into pods with the
names, labels and hostnames their controllers give them; `LocalPods` then starts every container of every pod with
the container's own command and args and its env resolved as the kubelet resolves it, with its volumes as local
folders, init containers first, and waits on each container's own readiness probe.

What differs from a real node, because every pod shares one host and one network namespace (see the test's
docstring for the full list): each pod gets its own free ports (the worker's `DSV4_PORT` and `DSV4_HOST`, the
gateway's `--port`/`--host`, Redis's `--port`), DNS names of Services and group leaders resolve to 127.0.0.1 with the
target pod's port, `status.podIP` is 127.0.0.1, and paths under a volume's mountPath in env values and args are
rewritten to that volume's local folder (no mount namespace: the test runs unprivileged).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from dsv4.protocol import contract
from dsv4.protocol import env as names
from dsv4.services.local_redis import free_port, redis_server_binary

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")
LWS_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"


class PodFailed(AssertionError):
    """A container exited or never became ready; the message carries its log tail."""


@dataclass
class Pod:
    """One pod as its controller would create it from a template."""

    name: str
    namespace: str
    template: dict[str, Any]
    labels: dict[str, str]
    hostname: str
    subdomain: str | None = None
    env_first: list[dict[str, Any]] = field(default_factory=list)  # what an admission webhook prepends (LWS)

    @property
    def spec(self) -> dict[str, Any]:
        """The pod spec."""
        spec: dict[str, Any] = self.template["spec"]
        return spec

    @property
    def annotations(self) -> dict[str, str]:
        """The pod's annotations (from its template)."""
        out: dict[str, str] = (self.template.get("metadata") or {}).get("annotations") or {}
        return out

    @property
    def component(self) -> str:
        """`app.kubernetes.io/component` of the pod."""
        return self.labels.get("app.kubernetes.io/component", "")


def expand(children: list[dict[str, Any]], lws_webhook: bool = True) -> list[Pod]:
    """The pods of every workload among `children`, named and labelled as their controllers do.

    LeaderWorkerSet pods also get what the LWS pod webhook adds (its labels and LWS_* env first in every
    container's env), when `lws_webhook`.
    """
    pods: list[Pod] = []
    for child in children:
        kind, meta, spec = child["kind"], child["metadata"], child.get("spec") or {}
        ns = meta["namespace"]
        if kind == "Deployment":
            for i in range(spec["replicas"]):
                name = f"{meta['name']}-{i}"
                labels = dict(spec["template"]["metadata"]["labels"])
                pods.append(Pod(name, ns, spec["template"], labels, name))
        elif kind == "StatefulSet":
            for i in range(spec["replicas"]):
                name = f"{meta['name']}-{i}"
                labels = {**spec["template"]["metadata"]["labels"], "apps.kubernetes.io/pod-index": str(i)}
                pods.append(Pod(name, ns, spec["template"], labels, name, spec.get("serviceName")))
        elif kind == "LeaderWorkerSet":
            size = spec["leaderWorkerTemplate"]["size"]
            template = spec["leaderWorkerTemplate"]["workerTemplate"]
            for g in range(spec["replicas"]):
                leader = f"{meta['name']}-{g}"
                subdomain = leader  # networkConfig.subdomainPolicy UniquePerReplica
                for i in range(size):
                    name = leader if i == 0 else f"{leader}-{i}"
                    labels = {**template["metadata"]["labels"], LWS_INDEX: str(i), LWS_GROUP: str(g)}
                    first = []
                    if lws_webhook:
                        first = [
                            {"name": "LWS_LEADER_ADDRESS", "value": f"{leader}.{subdomain}.{ns}"},
                            {"name": "LWS_GROUP_SIZE", "value": str(size)},
                            {"name": "LWS_WORKER_INDEX", "value": str(i)},
                        ]
                    pods.append(Pod(name, ns, template, labels, name, subdomain, first))
    return pods


def services(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Services among `children`, by name."""
    return {c["metadata"]["name"]: c for c in children if c["kind"] == "Service"}


@dataclass
class Running:
    """A started container."""

    pod: Pod
    container: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[int, int]  # containerPort -> local port
    env: dict[str, str]

    def tail(self, lines: int = 60) -> str:
        """The last lines of the container's log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.pod.name}/{self.container['name']} ({self.log}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


class LocalPods:
    """Pods of one deployment on this host. Use as a context manager; `stop()` ends every process.

    `volume_source(pod, volume)` gives the local folder of volumes the harness cannot make itself (PVCs, hostPaths,
    image volumes) or None for a fresh empty one; `secrets[(name, key)]` the Secrets' values; `external[host]` the
    local port of a server outside the deployment (a user's Redis).
    """

    def __init__(
        self,
        workdir: Path,
        children: list[dict[str, Any]],
        pods: list[Pod],
        volume_source: Callable[[Pod, dict[str, Any]], Path | None],
        secrets: Mapping[tuple[str, str], str],
        external: Mapping[str, int] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.children = children
        self.pods = pods
        self.volume_source = volume_source
        self.secrets = secrets
        self.external = dict(external or {})
        self.base_env = dict(base_env or {})
        self.running: list[Running] = []
        # Every pod's ports, chosen up front so any pod can resolve any other pod's address before it starts.
        self.ports: dict[str, dict[int, int]] = {
            p.name: {port["containerPort"]: free_port() for c in p.spec["containers"] for port in c.get("ports", [])}
            for p in pods
        }
        self.hosts = self._dns()

    def __enter__(self) -> LocalPods:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- names -----

    def _dns(self) -> dict[str, tuple[str, dict[int, int]]]:
        """Every DNS name a pod may use -> (pod name, its port map): Services (first selected pod) and the stable
        names of StatefulSet/LWS pods (`<hostname>.<subdomain>.<ns>`, with or without `.svc`)."""
        out: dict[str, tuple[str, dict[int, int]]] = {}
        for svc in services(self.children).values():
            selector = svc["spec"].get("selector") or {}
            chosen = [p for p in self.pods if selector and selector.items() <= p.labels.items()]
            if not chosen:
                continue
            pod = chosen[0]
            # A Service port maps to the pod's targetPort (by name or number).
            mapping = {}
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                container_port = self._named_port(pod, target)
                if container_port in self.ports[pod.name]:
                    mapping[port["port"]] = self.ports[pod.name][container_port]
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            for host in (f"{name}.{ns}.svc", f"{name}.{ns}", f"{name}.{ns}.svc.cluster.local"):
                out[host] = (pod.name, mapping)
        for pod in self.pods:
            if pod.subdomain:
                for host in (
                    f"{pod.hostname}.{pod.subdomain}.{pod.namespace}",
                    f"{pod.hostname}.{pod.subdomain}.{pod.namespace}.svc",
                ):
                    out[host] = (pod.name, dict(self.ports[pod.name]))
        return out

    @staticmethod
    def _named_port(pod: Pod, target: int | str) -> int:
        if isinstance(target, int):
            return target
        for c in pod.spec["containers"]:
            for port in c.get("ports", []):
                if port.get("name") == target:
                    return int(port["containerPort"])
        raise KeyError(f"pod {pod.name} has no port named {target!r}")

    def resolve_host(self, host: str) -> bool:
        """Whether `host` is a name this harness serves on 127.0.0.1."""
        return host in self.hosts or host in self.external

    def local_url(self, url: str) -> str:
        """`url` with a cluster DNS name and port replaced by 127.0.0.1 and the local port of its target."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        if host in self.external:
            local = self.external[host]
        elif host in self.hosts and port is not None:
            local = self.hosts[host][1][port]
        else:
            return url
        auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{local}"))

    # ----- one container -----

    def _field(self, pod: Pod, path: str) -> str:
        if path == "metadata.name":
            return pod.name
        if path == "metadata.namespace":
            return pod.namespace
        if path in ("status.podIP", "status.hostIP"):
            return "127.0.0.1"
        m = _FIELD.fullmatch(path)
        if m:
            source = pod.labels if m.group(1) == "labels" else pod.annotations
            return source[m.group(2)]
        raise KeyError(f"pod {pod.name}: downward API field {path!r} is not simulated")

    def resolve_env(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet resolves it (before the harness's substitutions)."""
        out: dict[str, str] = {}
        for e in [*pod.env_first, *container.get("env", [])]:
            if "value" in e:
                out[e["name"]] = _REF.sub(lambda m: out.get(m.group(1), m.group(0)), e["value"])
                continue
            source = e["valueFrom"]
            if "fieldRef" in source:
                out[e["name"]] = self._field(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                out[e["name"]] = self.secrets[(ref["name"], ref["key"])]
            else:
                raise KeyError(f"pod {pod.name}: env {e['name']} source {source} is not simulated")
        return out

    def _volumes(self, pod: Pod) -> dict[str, Path]:
        """A local folder per volume of the pod (made once per pod; init and main containers share them)."""
        root = self.workdir / "pods" / pod.name / "volumes"
        if root.exists():
            return {p.name: p for p in root.iterdir()}
        root.mkdir(parents=True)
        out: dict[str, Path] = {}
        for volume in pod.spec.get("volumes", []):
            folder = root / volume["name"]
            given = self.volume_source(pod, volume)
            if given is not None:
                folder.symlink_to(given, target_is_directory=True)
            else:
                folder.mkdir()
                self._fill(pod, volume, folder)
            out[volume["name"]] = folder
        return out

    def _fill(self, pod: Pod, volume: dict[str, Any], folder: Path) -> None:
        if "configMap" in volume:
            [cm] = [
                c
                for c in self.children
                if c["kind"] == "ConfigMap" and c["metadata"]["name"] == volume["configMap"]["name"]
            ]
            for item in volume["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]:
                (folder / item["path"]).write_text(cm["data"][item["key"]])
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            for item in volume["secret"]["items"]:
                (folder / item["path"]).write_text(self.secrets[(name, item["key"])])
        elif "downwardAPI" in volume:
            for item in volume["downwardAPI"]["items"]:
                (folder / item["path"]).write_text(self._field(pod, item["fieldRef"]["fieldPath"]))
        elif not volume.keys() & {"emptyDir", "hostPath"}:
            raise KeyError(f"pod {pod.name}: volume {volume['name']} has no local source")

    def _path_map(self, pod: Pod, container: dict[str, Any]) -> list[tuple[str, Path]]:
        volumes = self._volumes(pod)
        out = []
        for m in container.get("volumeMounts", []):
            local = volumes[m["name"]] / m.get("subPath", "")
            out.append((m["mountPath"].rstrip("/"), local))
        return sorted(out, key=lambda t: -len(t[0]))  # the longest mountPath wins (nested mounts)

    @staticmethod
    def _local_path(value: str, mounts: list[tuple[str, Path]]) -> str:
        for mount, local in mounts:
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    def command(self, pod: Pod, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """The argv and env the container runs with here, after the substitutions of the module docstring."""
        mounts = self._path_map(pod, container)
        env = self.resolve_env(pod, container)
        ports = self.ports[pod.name]
        http = next(
            (p["containerPort"] for p in container.get("ports", []) if p.get("name") in ("http", "redis")), None
        )
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if container["image"].startswith("redis:"):
            # The official image's entrypoint runs redis-server with the container's args.
            argv = [redis_server_binary() or "redis-server", *argv]
            i = argv.index("--port")
            argv[i + 1] = str(ports[int(argv[i + 1])])
        if argv[:2] == ["dsv4", "gateway"] and http is not None:
            argv += ["--host", "127.0.0.1", "--port", str(ports[http])]
        for name, value in list(env.items()):
            value = self._local_path(value, mounts)
            if "://" in value:
                value = self.local_url(value)
            elif value in self.hosts or value.split(".svc")[0] in self.hosts:
                value = "127.0.0.1"
            env[name] = value
        argv = [self._local_path(a, mounts) for a in argv]
        if http is not None and not container["image"].startswith("redis:"):
            env[names.PORT] = str(ports[http])
            env[names.HOST] = "127.0.0.1"
        rendezvous = self._rendezvous_port(pod)
        if rendezvous is not None and names.MASTER_PORT in env:
            env[names.MASTER_PORT] = str(rendezvous)
        if env.get(names.DEVICE) in ("cuda", "npu"):
            env[names.DEVICE] = "cpu"
        return argv, {**self.base_env, **env}

    def _rendezvous_port(self, pod: Pod) -> int | None:
        """The local port of the group leader's rendezvous (MASTER_ADDR:MASTER_PORT), the same for every rank."""
        env = self.resolve_env(pod, pod.spec["containers"][0])
        master = env.get(names.MASTER_ADDR)
        if master is None:
            return None
        if master == "127.0.0.1":
            return self.ports[pod.name].get(contract.RENDEZVOUS_PORT)
        target = self.hosts.get(master) or self.hosts.get(master.removesuffix(".svc"))
        if target is None:
            raise KeyError(f"pod {pod.name}: MASTER_ADDR {master} names no pod of this deployment")
        return self.ports[target[0]].get(contract.RENDEZVOUS_PORT)

    def _start(self, pod: Pod, container: dict[str, Any]) -> Running:
        argv, env = self.command(pod, container)
        log = self.workdir / "pods" / pod.name / f"{container['name']}.log"
        cwd = self._local_path(container.get("workingDir", "/tmp"), self._path_map(pod, container))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd if Path(cwd).is_dir() else self.workdir, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        running = Running(pod, container, proc, log, self.ports[pod.name], env)
        self.running.append(running)
        return running

    # ----- pods -----

    def run_init(self, pod: Pod, timeout: float = 300) -> None:
        """Run the pod's init containers in order; each must exit 0."""
        for container in pod.spec.get("initContainers", []):
            r = self._start(pod, container)
            try:
                code = r.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise PodFailed(
                    f"init container {pod.name}/{container['name']} ran over {timeout}s\n{r.tail()}"
                ) from None
            if code != 0:
                raise PodFailed(f"init container {pod.name}/{container['name']} exited with {code}\n{r.tail()}")

    def start(self, pod: Pod) -> list[Running]:
        """Start the pod's containers (after its init containers)."""
        self.run_init(pod)
        return [self._start(pod, c) for c in pod.spec["containers"]]

    def wait_ready(self, running: list[Running], timeout: float) -> None:
        """Poll each container's own readiness probe until it passes; fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        pending = list(running)
        while pending:
            for r in list(pending):
                if r.proc.poll() is not None:
                    raise PodFailed(f"{r.pod.name}/{r.container['name']} exited with {r.proc.returncode}\n{r.tail()}")
                if probe(r):
                    pending.remove(r)
            if pending and time.monotonic() > deadline:
                raise PodFailed("not ready in time:\n" + "\n".join(r.tail() for r in pending))
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after 20 s."""
        for r in self.running:
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for r in self.running:
            try:
                r.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()

    def logs(self) -> str:
        """Every container's log tail, for failure reports."""
        return "\n".join(r.tail(30) for r in self.running)

    def url(self, pod: Pod, container_port: int) -> str:
        """The local base URL of a pod's container port."""
        return f"http://127.0.0.1:{self.ports[pod.name][container_port]}"


def probe(r: Running) -> bool:
    """One run of the container's readiness probe (httpGet or tcpSocket), on its local port."""
    spec = r.container.get("readinessProbe")
    if spec is None:
        return True
    if "httpGet" in spec:
        port = r.ports[int(spec["httpGet"]["port"])]
        try:
            return httpx.get(f"http://127.0.0.1:{port}{spec['httpGet']['path']}", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
    if "tcpSocket" in spec:
        try:
            with socket.create_connection(("127.0.0.1", r.ports[int(spec["tcpSocket"]["port"])]), timeout=1.0):
                return True
        except OSError:
            return False
    raise KeyError(f"probe {spec} is not simulated")
