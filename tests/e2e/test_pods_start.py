"""Pods that really start: every container of every pod the operator renders for each example, run on CPU as a
local process with the tiny model, must reach readiness on its own probe, and a request through the gateway must
complete. This catches pod-spec bugs kwok cannot (kwok never starts a container), like the gateway that crash-looped
on `DSV4_MODEL=/models` without a model volume.

How an example becomes local processes:

1. Layout scaled to the tiny model (tiny-flash: 4 heads, 2 o-groups, 8 experts; at most 2-way tensor or expert
   parallel), structure kept: every pool gets 1 replica (gateway too), `podsPerReplica` unchanged, one device per
   pod (`devicesPerPod: 1`, so `tensor x data = podsPerReplica`, data kept where the example has it (the Ascend
   example's TP16 x DP2 becomes TP1 x DP2: data-parallel attention with the experts over both pods); cpu pools
   `data = podsPerReplica`), autoscaling off.
   The spec is admitted with the CRD's defaults and CEL rules (in-process) and rendered by `builders.children`.
2. Workloads become pods as their controllers name them: Deployment `<name>-<i>`, StatefulSet `<sts>-<ordinal>`
   (with the `apps.kubernetes.io/pod-index` label), LeaderWorkerSet `<lws>-<g>` and `<lws>-<g>-<i>`; for LWS the
   harness also adds what the LWS pod webhook adds (worker/group index labels, `LWS_LEADER_ADDRESS`,
   `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX` first in the env).
3. Each container runs its own command and args with its env resolved as the kubelet does (`$(VAR)`, downward API:
   pod name, labels, annotations, `status.podIP` = 127.0.0.1; Secrets from the test's values). Init containers run
   first and must exit 0 (the tiny checkpoint writer, the weights pre-warm).
4. Volumes are local folders: ConfigMap and Secret items and downward-API files written out, emptyDirs (and the
   memory-backed /dev/shm) as fresh folders, the PVC / hostPath / image holding the weights as a folder with the
   tiny checkpoint at the claim's subPath, the node-local cache hostPath as one folder shared by all pods (one node),
   the Ascend driver hostPaths as empty folders. Paths under a mountPath in env values and args are rewritten to the
   volume's folder (no mount namespace: the test needs no root).

Substitutions (one host, one network namespace, no accelerator), and nothing else:
- ports: each pod gets its own free port per containerPort; workers get `DSV4_PORT`/`DSV4_HOST=127.0.0.1`, the
  gateway `--host 127.0.0.1 --port N` (it reads its port from the command line only), Redis `--port N`;
- DNS: Service names, StatefulSet/LWS pod names and the leader's `MASTER_ADDR` resolve to 127.0.0.1 with the target
  pod's port, URLs in env (the Redis URL) are rewritten to it; `MASTER_PORT` is the leader's local rendezvous port;
- `DSV4_DEVICE` cuda/npu becomes cpu (bf16 stays: the tiny model runs it on CPU); `OMP_NUM_THREADS=1`;
- a managed Redis runs `redis-server` with the pod's args (the redis image's entrypoint); the external Redis of
  the Ascend example is a local `redis-server` with the Secret's password.

What a group of several pods asserts: every pod of the group starts with consistent rank env (the same
WORLD_SIZE = pods x NPROC_PER_NODE, node ranks 0..n-1, one MASTER_ADDR naming the leader pod and one local
MASTER_PORT) and reaches readiness on its own /readyz. A tensor-parallel group's pods really form one gloo group of
ranks through the launcher (the leader's log names the group and its warm-up, every other pod's log its rank), so the
requests of `_serve_requests` run through it (the Ascend example's as data-parallel attention); a cpu pool's pods
(tensor 1, data = pods, no expert parallelism) serve alone.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.operator import builders, role_config
from dsv4.operator.builders import ClusterApis
from dsv4.operator.ownership import Owner
from dsv4.protocol import contract, env, keys
from dsv4.services.local_redis import free_port, redis_server_binary
from tests.e2e.local_pods import LocalPods, Pod, PodFailed, Running, expand
from tests.unit.operator.conftest import admit_resource

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMESPACE = "dsv4-test"
READY_TIMEOUT_S = 600  # several torch processes load the model on 2 shared cores
CASES = [
    ("tiny-cpu", False),
    ("flash-h200", False),
    ("pro-h200", False),
    ("pro-h200", True),
    ("pro-ascend-910c", False),
]
PASSWORD = "pw-test"
API_KEY = "key-test"


def scale_to_tiny(doc: dict[str, Any]) -> dict[str, Any]:
    """The example with the tiny model's layout and one replica per pool (module docstring, step 1)."""
    doc = copy.deepcopy(doc)
    spec = doc["spec"]
    cpu = spec["accelerator"]["type"] == "cpu"
    if not cpu:
        spec["accelerator"]["devicesPerPod"] = 1
    for name in ("prefill", "decode"):
        pool = spec.setdefault(name, {})
        pods = pool.get("podsPerReplica", 1)
        given = pool.get("parallelism") or {}
        expert = given.get("expert", False)
        data = pods if cpu else min(given.get("data", 1), pods)  # data-parallel attention stays (Ascend example)
        pool["parallelism"] = {"tensor": pods // data, "data": data, "expert": expert}
        pool.update(replicas=1, minReplicas=1)
    spec.setdefault("gateway", {}).update(replicas=1, minReplicas=1)
    spec.setdefault("autoscaling", {})["enabled"] = False
    return doc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint every weights volume holds."""
    return write_checkpoint(tmp_path_factory.mktemp("weights") / "tiny-flash", "tiny-flash")


@pytest.fixture
def user_redis() -> Iterator[int]:
    """An existing Redis with a password, as the Ascend example's `redis.url` names."""
    port = free_port()
    binary = redis_server_binary()
    assert binary is not None, "redis-server is not installed (make system-deps)"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", PASSWORD]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=PASSWORD)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _volume_source(spec: Any, checkpoint: Path, workdir: Path) -> Any:
    src = spec.model.source
    cache = spec.model.local_cache

    def source(pod: Pod, volume: dict[str, Any]) -> Path | None:
        if "persistentVolumeClaim" in volume or "image" in volume:
            # The claim's volume: the checkpoint sits at the mount's subPath, as on the real PV.
            root = workdir / "pv"
            if not root.exists():
                sub = src.pvc.sub_path if src is not None and src.pvc is not None else ""
                (root / sub).parent.mkdir(parents=True, exist_ok=True)
                (root / sub).symlink_to(checkpoint, target_is_directory=True) if sub else root.symlink_to(checkpoint)
            return root
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if src is not None and path == src.host_path:
                return checkpoint
            if cache is not None and path == cache.host_path:
                node = workdir / "node-cache"  # one node: every pod shares it
                node.mkdir(exist_ok=True)
                return node
        return None

    return source


def check_group(pods: LocalPods, group: list[Pod], running: dict[str, Running], ranks: int) -> None:
    """A rank group's pods agree on their rank env and, unless each pod serves alone (`ranks` 1), form one group of
    `ranks` ranks (module docstring: what a group asserts)."""
    resolved = [pods.resolve_env(p, p.spec["containers"][0]) for p in group]
    size = len(group)
    nproc = {e[env.NPROC_PER_NODE] for e in resolved}
    assert len(nproc) == 1 and {e[env.WORLD_SIZE] for e in resolved} == {str(size * int(nproc.pop()))}
    assert sorted(e[env.NODE_RANK] for e in resolved) == [str(i) for i in range(size)]
    [master] = {e[env.MASTER_ADDR] for e in resolved}
    [leader] = [p for p, e in zip(group, resolved, strict=True) if e[env.NODE_RANK] == "0"]
    assert pods.hosts.get(master, pods.hosts.get(master.removesuffix(".svc"), ("",)))[0] == leader.name, master
    assert len({running[p.name].env[env.MASTER_PORT] for p in group}) == 1
    leader_log = running[leader.name].log.read_text()
    if ranks == 1:  # pure data parallel: each pod serves alone
        assert " ranks on " not in leader_log, leader_log
        return
    # Ready means every rank loaded and the leader's warm-up ran through all of them.
    assert f"{ranks} ranks on cpu (1 on this pod)" in leader_log, leader_log
    assert "rank 0 dsv4.worker: warm-up step took" in leader_log, leader_log
    for p in group:
        if p is not leader:
            assert f"rank {int(running[p.name].env[env.NODE_RANK])} " in running[p.name].log.read_text()


def _groups(pods: list[Pod]) -> dict[tuple[str, str], list[Pod]]:
    out: dict[tuple[str, str], list[Pod]] = {}
    for p in pods:
        g = p.labels.get("dsv4.io/group", p.labels.get("leaderworkerset.sigs.k8s.io/group-index"))
        if g is not None:
            out.setdefault((p.component, g), []).append(p)
    return out


def _prompt_tokens(children: list[dict[str, Any]]) -> int:
    [cm] = [c for c in children if c["kind"] == "ConfigMap"]
    gateway = yaml.safe_load(cm["data"]["gateway.yaml"])
    return int(gateway["disaggregation"]["minPromptTokens"])


@pytest.mark.parametrize(("name", "lws"), CASES, ids=[f"{n}{'-lws' if lws else ''}" for n, lws in CASES])
def test_every_container_of_the_example_starts_and_serves(
    name: str, lws: bool, checkpoint: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    doc = scale_to_tiny(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))
    spec = admit_resource({"metadata": doc["metadata"], "spec": doc["spec"]})
    owner = Owner(doc["metadata"]["name"], NAMESPACE, "uid-local")
    children = builders.children(owner, spec, "dsv4:local", ClusterApis(leader_worker_set=lws))
    pods = expand(children)
    secrets = {("dsv4-redis", "password"): PASSWORD, ("dsv4-api-keys", "keys"): API_KEY}
    external = {}
    if not spec.redis.managed:
        assert spec.redis.url is not None
        host = spec.redis.url.split("//", 1)[1].split(":", 1)[0]
        external[host] = request.getfixturevalue("user_redis")
    venv_bin = str(Path(sys.executable).parent)
    base_env = {
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
    }
    local = LocalPods(tmp_path, children, pods, _volume_source(spec, checkpoint, tmp_path), secrets, external, base_env)
    with local:
        try:
            # Redis first, as the kubelet would eventually converge to: the roles need it to become ready.
            first = [p for p in pods if p.component == "redis"]
            local.wait_ready([r for p in first for r in local.start(p)], 60)
            running = {p.name: r for p in pods if p not in first for r in local.start(p)}
            local.wait_ready(list(running.values()), READY_TIMEOUT_S)
            for group in _groups(pods).values():
                par = getattr(spec, group[0].component).parallelism
                alone = par.tensor == 1 and not par.expert  # each pod a replica (`group_world`)
                check_group(local, group, running, 1 if alone else par.tensor * par.data)
            # The weights pre-warm: the first pod on the (one) node copies with progress, the others find it done.
            warm = [r.log.read_text() for r in local.running if r.container["name"] == "prewarm-weights"]
            if warm:
                assert "prewarm: copying" in warm[0] and "(100.0%)" in warm[0] and "is complete" in warm[0], warm[0]
                assert all("already holds the checkpoint" in log for log in warm[1:]), warm
            _serve_requests(local, pods, children, spec)
        except (PodFailed, AssertionError, httpx.HTTPError) as err:
            raise AssertionError(f"{err}\n\n{local.logs()}") from err
    assert {p.component for p in pods} >= {"gateway", "prefill", "decode"}


def _serve_requests(local: LocalPods, pods: list[Pod], children: list[dict[str, Any]], spec: Any) -> None:
    [gateway] = [p for p in pods if p.component == "gateway"]
    base = local.url(gateway, contract.GATEWAY_PORT)
    headers = {"Authorization": f"Bearer {API_KEY}"} if spec.auth.api_key_secret_ref is not None else {}
    model = role_config.served_model_name(spec)
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == model
        short = client.post(
            "/v1/completions", json={"model": model, "prompt": "The capital of France", "max_tokens": 3}
        )
        assert short.status_code == 200, short.text
        assert short.json()["usage"]["completion_tokens"] >= 1
        # A prompt past minPromptTokens goes through the prefill pool and the KV handoff to decode.
        words = " ".join(["token"] * (_prompt_tokens(children) + 16))
        long = client.post("/v1/completions", json={"model": model, "prompt": words, "max_tokens": 2})
        assert long.status_code == 200, long.text
        assert long.json()["usage"]["prompt_tokens"] > _prompt_tokens(children)
    redis_url = next(r.env[env.REDIS_URL] for r in local.running if env.REDIS_URL in r.env)
    password = next((r.env[env.REDIS_PASSWORD] for r in local.running if env.REDIS_PASSWORD in r.env), None)
    client = redis.Redis.from_url(redis_url, password=password)
    # The prefill pool's streams: the shared one and each worker's own (prefix-aware routing pushes jobs there).
    name = spec_name(local)
    workers = client.smembers(keys.workers_key(name, keys.PREFILL_STREAM))
    streams = [keys.stream_key(name, keys.PREFILL_STREAM)]
    streams += [keys.worker_stream_key(name, keys.PREFILL_STREAM, w.decode()) for w in workers]
    groups = [g for key in streams for g in client.xinfo_groups(key)]
    assert sum(int(g.get("entries-read") or 0) for g in groups) >= 1, groups


def spec_name(local: LocalPods) -> str:
    """The deployment name every role namespaces its Redis keys with."""
    return next(r.env[env.DEPLOYMENT] for r in local.running if env.DEPLOYMENT in r.env)
