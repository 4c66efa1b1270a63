"""Spec → the child objects of a DeepSeekV4Deployment (docs/operator.md), as plain dicts ready for server-side apply.

Children: one ConfigMap (a config file per role); per role a Service + PodDisruptionBudget and its workload: the
gateway's Deployment, and for prefill and decode the workloads of their rank groups (`rank_groups`: a Deployment,
a LeaderWorkerSet, or a StatefulSet + headless Service per group); when `redis.managed`, a Redis StatefulSet +
Service; a ServiceMonitor when the cluster has that CRD. Every child carries the `app.kubernetes.io/*` labels and a
controller owner reference, so deleting the resource garbage-collects them. Each pod template is annotated with the
hash of its own role's config file only, so a change that concerns one pool rolls that pool alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import yaml

from dsv4.operator import api, rank_groups, rank_table
from dsv4.operator.profiles import Profile, profile
from dsv4.operator.quantity import from_bytes, to_bytes
from dsv4.operator.rank_groups import Layout, Shape
from dsv4.operator.spec import DeploymentSpec, PoolSpec, Resources, Scheduling
from dsv4.protocol import contract, env
from dsv4.protocol.config import GatewayFile, PrefixCacheConfig, PrefixRoutingConfig, WorkerFile
from dsv4.protocol.contract import Role

APP_NAME = "dsv4"
MANAGER = "dsv4-operator"
REDIS_PORT = 6379
REDIS_UID = 999  # the uid of the official redis image's `redis` user
APP_UID = 1000  # the non-root user of the dsv4 image (Dockerfile)
CONFIG_HASH_ANNOTATION = "dsv4.io/config-hash"
# After its drain timeout a worker still flushes telemetry and closes its connections before SIGKILL.
EXIT_MARGIN_SECONDS = 15
GATEWAY_GRACE_SECONDS = 60
# Endpoint controllers and load balancers drop a terminating gateway pod within a few seconds; until then it must
# keep accepting, so it sleeps before its SIGTERM (uvicorn then finishes open streams for up to 30 s).
GATEWAY_PRESTOP_SECONDS = 5
TINY_PRESET = "tiny-flash"  # the checkpoint `model.variant: tiny` writes into each worker pod at start
MODEL_CACHE_DIR = "/model-cache"  # node-local copy of the weights (model.localCache)
METRICS_LABEL = "dsv4.io/metrics"  # on the Services the ServiceMonitor scrapes
SERVICE_MONITOR_API_VERSION = "monitoring.coreos.com/v1"
# Released checkpoints take many minutes to load; the startup probe allows up to this long before liveness applies.
STARTUP_SECONDS = {"tiny": 300, "custom": 3600, "flash": 3600, "pro": 5400}


@dataclass(frozen=True)
class ClusterApis:
    """Optional APIs the cluster serves; they decide the shape of some children."""

    leader_worker_set: bool = False
    service_monitor: bool = False


@dataclass(frozen=True)
class Owner:
    """The DeepSeekV4Deployment the children belong to."""

    name: str
    namespace: str
    uid: str


def labels(owner: Owner, component: str) -> dict[str, str]:
    """Selector labels of one component; also what `kubectl get -l` users filter on."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }


def _all_labels(owner: Owner, component: str) -> dict[str, str]:
    return {**labels(owner, component), "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "dsv4"}


def child_name(owner: Owner, component: str) -> str:
    """Name of the children of `component` (gateway, prefill, decode, redis, config)."""
    return f"{owner.name}-{component}"


def _metadata(owner: Owner, component: str, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or child_name(owner, component),
        "namespace": owner.namespace,
        "labels": _all_labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def redis_url(owner: Owner, spec: DeploymentSpec) -> str:
    """The Redis every role connects to: the managed one's Service, or the user's URL."""
    if spec.redis.managed:
        return f"redis://{child_name(owner, 'redis')}.{owner.namespace}.svc:{REDIS_PORT}/0"
    assert spec.redis.url is not None  # CEL: managed xor url
    return spec.redis.url


def served_model_name(spec: DeploymentSpec) -> str:
    """The model id the gateway answers to (`/v1/models`, the `model` field of requests)."""
    return f"deepseek-v4-{spec.model.variant}"


def role_config(owner: Owner, spec: DeploymentSpec, role: Role) -> GatewayFile | WorkerFile:
    """The settings file of one role (mounted at contract.CONFIG_FILE): exactly the model that role reads."""
    prefix = spec.prefix_cache
    if role is Role.GATEWAY:
        return GatewayFile(
            deployment=owner.name,
            served_model_name=served_model_name(spec),
            disaggregation=spec.disaggregation,
            prefix_routing=PrefixRoutingConfig(enabled=prefix.enabled, max_queued_tokens=prefix.max_queued_tokens),
        )
    pool = spec.prefill if role is Role.PREFILL else spec.decode
    return WorkerFile(
        deployment=owner.name,
        kv_handoff=spec.kv_handoff,
        parallelism=pool.parallelism,
        prefix_cache=PrefixCacheConfig(enabled=prefix.enabled, tier=prefix.tier),
    )


def _config_text(owner: Owner, spec: DeploymentSpec, role: Role) -> str:
    return yaml.safe_dump(role_config(owner, spec, role).model_dump(by_alias=True, mode="json"), sort_keys=True)


def config_map(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    """The ConfigMap holding one config file per role."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, "config"),
        "data": {f"{role.value}.yaml": _config_text(owner, spec, role) for role in Role},
    }


def _resources(res: Resources, extra: dict[str, str], shm_bytes: int = 0) -> dict[str, Any]:
    requests = {k: str(v) for k, v in res.requests.items()}
    limits = {k: str(v) for k, v in res.limits.items()}
    # Extended resources (devices) must be requested and limited alike.
    requests.update(extra)
    limits.update(extra)
    if shm_bytes:
        # A memory-backed /dev/shm is charged to the container's memory: reserve it on top of what the user asked.
        requests["memory"] = from_bytes(to_bytes(requests.get("memory", 0)) + shm_bytes)
        if "memory" in limits:
            limits["memory"] = from_bytes(to_bytes(limits["memory"]) + shm_bytes)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container_security(add: tuple[str, ...] = ()) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if add:
        capabilities["add"] = list(add)
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": capabilities,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _placement(base_selector: dict[str, str], base_tol: list[dict[str, Any]], sched: Scheduling) -> dict[str, Any]:
    selector = {**base_selector, **sched.node_selector}
    tolerations = base_tol + [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = selector
    if tolerations:
        out["tolerations"] = tolerations
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    return out


def _source_volume(spec: DeploymentSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint source as a volume and its read-only mount at contract.MODEL_DIR."""
    src = spec.model.source
    assert src is not None  # callers check
    mount: dict[str, Any] = {"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True}
    if src.pvc is not None:
        volume: dict[str, Any] = {"name": "model", "persistentVolumeClaim": {"claimName": src.pvc.claim_name}}
        volume["persistentVolumeClaim"]["readOnly"] = True
        if src.pvc.sub_path:
            mount["subPath"] = src.pvc.sub_path
    elif src.image is not None:
        volume = {"name": "model", "image": {"reference": src.image, "pullPolicy": spec.image_pull_policy}}
    else:
        volume = {"name": "model", "hostPath": {"path": src.host_path, "type": "Directory"}}
    return volume, mount


def gateway_reads_checkpoint(spec: DeploymentSpec) -> bool:
    """Whether the gateway mounts the checkpoint for its tokenizer.

    Flash, Pro and tiny use the official DeepSeek-V4 tokenizer, which the image bundles (byte-identical to the
    released files): their gateways mount nothing and never pull or attach the weights. A custom checkpoint may
    bring its own tokenizer, so the gateway mounts its source read-only.
    """
    return spec.model.variant == "custom" and spec.model.source is not None


def _cache_key(spec: DeploymentSpec) -> str:
    """The folder of this checkpoint in a node-local cache shared by deployments (stable across pods)."""
    src = spec.model.source
    assert src is not None
    where = src.model_dump_json(by_alias=True, exclude_none=True)
    digest = hashlib.sha256(f"{where}|{spec.model.revision or ''}".encode()).hexdigest()[:12]
    return f"{spec.model.variant}-{digest}"


@dataclass(frozen=True)
class _WorkerModel:
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]  # of the worker container
    init_containers: list[dict[str, Any]]
    path: str  # env.MODEL of the worker


def _worker_model(spec: DeploymentSpec, base: dict[str, Any]) -> _WorkerModel:
    """Where a worker's checkpoint comes from, and the init container that puts it in place, if any.

    `base` holds the fields every container of the pod shares (image, env, security, /tmp).
    """
    if spec.model.source is None:
        # tiny: a deterministic random checkpoint (seed 0), so prefill and decode pods hold identical weights.
        init = {
            **base,
            "name": "write-tiny-checkpoint",
            "command": ["dsv4", "make-checkpoint", "--preset", TINY_PRESET, contract.MODEL_DIR],
            "volumeMounts": [*base["volumeMounts"], {"name": "model", "mountPath": contract.MODEL_DIR}],
        }
        return _WorkerModel(
            volumes=[{"name": "model", "emptyDir": {}}],
            mounts=[{"name": "model", "mountPath": contract.MODEL_DIR, "readOnly": True}],
            init_containers=[init],
            path=contract.MODEL_DIR,
        )
    volume, mount = _source_volume(spec)
    cache = spec.model.local_cache
    if cache is None:
        return _WorkerModel(volumes=[volume], mounts=[mount], init_containers=[], path=contract.MODEL_DIR)
    if cache.host_path:
        cache_volume: dict[str, Any] = {
            "name": "model-cache",
            "hostPath": {"path": cache.host_path, "type": "DirectoryOrCreate"},
        }
        target = f"{MODEL_CACHE_DIR}/{_cache_key(spec)}"
    else:
        cache_volume = {"name": "model-cache", "emptyDir": {}}
        if cache.size_limit is not None:
            cache_volume["emptyDir"]["sizeLimit"] = str(cache.size_limit)
        target = MODEL_CACHE_DIR
    init = {
        **base,
        "name": "prewarm-weights",
        "command": ["python", "-m", "dsv4.operator.prewarm", contract.MODEL_DIR, target],
        "volumeMounts": [*base["volumeMounts"], mount, {"name": "model-cache", "mountPath": MODEL_CACHE_DIR}],
    }
    return _WorkerModel(
        volumes=[volume, cache_volume],
        mounts=[{"name": "model-cache", "mountPath": MODEL_CACHE_DIR, "readOnly": True}],
        init_containers=[init],
        path=target,
    )


def _env(owner: Owner, spec: DeploymentSpec, role: Role, device: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": env.DEPLOYMENT, "value": owner.name},
        {"name": env.ROLE, "value": role.value},
        {"name": env.CONFIG_FILE, "value": contract.CONFIG_FILE},
        {"name": env.REDIS_URL, "value": redis_url(owner, spec)},
        {"name": env.DEVICE, "value": device},
        {"name": env.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": env.POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # The root filesystem is read-only: every cache (torch, triton, HF) goes to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
        {"name": "OTEL_SERVICE_NAME", "value": f"dsv4-{role.value}"},
        {
            "name": "OTEL_RESOURCE_ATTRIBUTES",
            "value": f"k8s.namespace.name={owner.namespace},service.namespace={owner.name}",
        },
        {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(spec.telemetry.sampling_ratio)},
    ]
    if spec.telemetry.otlp_endpoint:
        out.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": spec.telemetry.otlp_endpoint})
    else:
        out.append({"name": "OTEL_TRACES_EXPORTER", "value": "none"})
    if spec.redis.secret_ref is not None:
        ref = spec.redis.secret_ref
        out.append(
            {
                "name": env.REDIS_PASSWORD,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    tier_ref = spec.prefix_cache.tier_secret_ref
    if role is Role.PREFILL and tier_ref is not None:  # only prefill workers use the shared tier
        out.append(
            {
                "name": env.PREFIX_TIER_REDIS_PASSWORD,
                "valueFrom": {"secretKeyRef": {"name": tier_ref.name, "key": tier_ref.key}},
            }
        )
    if role is Role.GATEWAY and spec.auth.api_key_secret_ref is not None:
        out.append({"name": env.API_KEY_FILE, "value": contract.API_KEY_FILE})
    return out


def _common_volumes(owner: Owner, role: Role) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "config",
            "configMap": {
                "name": child_name(owner, "config"),
                "items": [{"key": f"{role.value}.yaml", "path": contract.CONFIG_FILE.rsplit("/", 1)[-1]}],
            },
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
    ]
    return volumes, mounts


def _pod_annotations(owner: Owner, spec: DeploymentSpec, role: Role, port: int) -> dict[str, str]:
    config_hash = hashlib.sha256(_config_text(owner, spec, role).encode()).hexdigest()[:16]
    return {
        CONFIG_HASH_ANNOTATION: config_hash,
        # For Prometheus set-ups that discover pods by annotation (the ServiceMonitor covers the Operator's).
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": contract.METRICS_PATH,
    }


def _pod_security(groups: tuple[int, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": APP_UID,
        "runAsGroup": APP_UID,
        "fsGroup": APP_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if groups:
        out["supplementalGroups"] = list(groups)
    return out


def _gateway_template(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    role, port = Role.GATEWAY, contract.GATEWAY_PORT
    volumes, mounts = _common_volumes(owner, role)
    container_env = _env(owner, spec, role, "cpu")
    if gateway_reads_checkpoint(spec):
        volume, mount = _source_volume(spec)
        volumes.append(volume)
        mounts.append(mount)
        container_env.append({"name": env.MODEL, "value": contract.MODEL_DIR})
    if spec.auth.api_key_secret_ref is not None:
        ref = spec.auth.api_key_secret_ref
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "keys"}]},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": contract.API_KEY_DIR, "readOnly": True})
    container = {
        "name": role.value,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsv4", role.value],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": container_env,
        "resources": _resources(spec.gateway.resources, {}),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "startupProbe": _probe(contract.HEALTH_PATH, port, 5, 24),
        "livenessProbe": _probe(contract.HEALTH_PATH, port, 10, 3),
        "readinessProbe": _probe(contract.READY_PATH, port, 5, 2),
        "lifecycle": {"preStop": {"sleep": {"seconds": GATEWAY_PRESTOP_SECONDS}}},
    }
    pod_spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GATEWAY_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
        # The gateway never touches a device: it runs on any node, whatever the workers' accelerator.
        **_placement({}, [], spec.gateway.scheduling),
    }
    return {
        "metadata": {
            "labels": _all_labels(owner, role.value),
            "annotations": _pod_annotations(owner, spec, role, port),
        },
        "spec": pod_spec,
    }


def worker_pool(spec: DeploymentSpec, role: Role) -> PoolSpec:
    """The pool spec of a worker role."""
    if role is Role.GATEWAY:
        raise ValueError("the gateway is not a worker pool")
    return spec.prefill if role is Role.PREFILL else spec.decode


def pool_shape(spec: DeploymentSpec, role: Role, apis: ClusterApis) -> Shape:
    """How the replicas of a worker pool become workloads on this cluster."""
    return rank_groups.shape(worker_pool(spec, role).pods_per_replica, apis.leader_worker_set)


def layout(spec: DeploymentSpec, role: Role) -> Layout:
    """The ranks of one group of a worker pool."""
    pool = worker_pool(spec, role)
    return Layout(pods=pool.pods_per_replica, ranks_per_pod=profile(spec.accelerator, pool).ranks_per_pod)


def _worker_template(
    owner: Owner, spec: DeploymentSpec, role: Role, kind: Shape, group: int | None = None
) -> dict[str, Any]:
    """The pod template of a prefill or decode pool (`group`: the group index in the StatefulSet fallback)."""
    pool = worker_pool(spec, role)
    prof: Profile = profile(spec.accelerator, pool)
    port = contract.WORKER_PORT
    volumes, mounts = _common_volumes(owner, role)
    pod_labels = _all_labels(owner, role.value)
    selector = labels(owner, role.value)
    leader = None
    if group is not None:
        pod_labels[rank_groups.GROUP_LABEL] = str(group)
        selector = {**selector, rank_groups.GROUP_LABEL: str(group)}
        leader = rank_groups.leader_address(child_name(owner, role.value), group, owner.namespace)
    container_env = [
        *_env(owner, spec, role, prof.device),
        *rank_groups.rank_env(kind, layout(spec, role), leader),
        {"name": env.DRAIN_TIMEOUT_S, "value": str(pool.drain_seconds)},
        *prof.env,
    ]
    security = _container_security(prof.add_capabilities)
    base = {
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": container_env,
        "securityContext": security,
        "volumeMounts": list(mounts),
    }
    model = _worker_model(spec, base)
    container_env.append({"name": env.MODEL, "value": model.path})
    volumes += model.volumes + prof.volumes
    mounts += model.mounts + prof.mounts
    if prof.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": prof.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    annotations = _pod_annotations(owner, spec, role, port)
    if prof.rank_table:
        # The operator rewrites the annotation on every pod of the group once the table is complete; the kubelet
        # refreshes the file (no restart).
        annotations[rank_table.TABLE_ANNOTATION] = rank_table.INITIALIZING
        field_path = f"metadata.annotations['{rank_table.TABLE_ANNOTATION}']"
        file = contract.RANK_TABLE_FILE.rsplit("/", 1)[-1]
        volumes.append(
            {"name": "rank-table", "downwardAPI": {"items": [{"path": file, "fieldRef": {"fieldPath": field_path}}]}}
        )
        mounts.append({"name": "rank-table", "mountPath": contract.RANK_TABLE_DIR, "readOnly": True})
    startup_failures = STARTUP_SECONDS[spec.model.variant] // 10
    container = {
        "name": role.value,
        **base,
        "command": ["dsv4", role.value],
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(pool.resources, prof.resources, prof.shm_bytes),
        "volumeMounts": mounts,
        "startupProbe": _probe(contract.HEALTH_PATH, port, 10, max(startup_failures, 3)),
        "livenessProbe": _probe(contract.HEALTH_PATH, port, 10, 3),
        # /readyz answers 200 once all of the pod's ranks joined the group and one warm-up step ran.
        "readinessProbe": _probe(contract.READY_PATH, port, 5, 2),
    }
    pod_spec: dict[str, Any] = {
        "securityContext": _pod_security(prof.supplemental_groups),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": pool.drain_seconds + EXIT_MARGIN_SECONDS,
        "initContainers": model.init_containers,
        "containers": [container],
        "volumes": volumes,
        **_placement(prof.node_selector, prof.tolerations, pool.scheduling),
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    group_affinity = rank_groups.affinity(kind, selector, prof.topology_key)
    if group_affinity:
        pod_spec["affinity"] = group_affinity
    return {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec}


def deployment(owner: Owner, spec: DeploymentSpec, role: Role) -> dict[str, Any]:
    """The Deployment of the gateway, or of a worker pool whose replicas are single pods."""
    if role is Role.GATEWAY:
        replicas, template = spec.gateway.replicas, _gateway_template(owner, spec)
    else:
        replicas, template = worker_pool(spec, role).replicas, _worker_template(owner, spec, role, Shape.SINGLE)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, role.value),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels(owner, role.value)},
            # Never go below the desired count during a rollout: a worker pod is expensive to lose, cheap to add.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": template,
        },
    }


def leader_worker_set(owner: Owner, spec: DeploymentSpec, role: Role) -> dict[str, Any]:
    """The LeaderWorkerSet of a worker pool whose replicas span several pods (LWS installed)."""
    pool = worker_pool(spec, role)
    return {
        "apiVersion": rank_groups.LWS_API_VERSION,
        "kind": rank_groups.LWS_KIND,
        "metadata": _metadata(owner, role.value),
        "spec": {
            "replicas": pool.replicas,
            # Workers start with the leader, not after it is Ready: the leader is Ready only once every rank joined.
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1},
            },
            # A headless Service per group (`<lws>-<g>`): the pool's own Service keeps the name `<lws>`.
            "networkConfig": {"subdomainPolicy": "UniquePerReplica"},
            "leaderWorkerTemplate": {
                "size": pool.pods_per_replica,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": _worker_template(owner, spec, role, Shape.LWS),
            },
        },
    }


def _group_selector(owner: Owner, role: Role, group: int) -> dict[str, str]:
    return {**labels(owner, role.value), rank_groups.GROUP_LABEL: str(group)}


def group_stateful_set(owner: Owner, spec: DeploymentSpec, role: Role, group: int) -> dict[str, Any]:
    """The StatefulSet of one rank group (no LWS): ordinal 0 leads; pods start together."""
    pool = worker_pool(spec, role)
    name = rank_groups.group_name(child_name(owner, role.value), group)
    meta = _metadata(owner, role.value, name)
    meta["labels"][rank_groups.GROUP_LABEL] = str(group)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": pool.pods_per_replica,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": _group_selector(owner, role, group)},
            "revisionHistoryLimit": 3,
            "template": _worker_template(owner, spec, role, Shape.STATEFULSETS, group),
        },
    }


def group_service(owner: Owner, role: Role, group: int) -> dict[str, Any]:
    """The headless Service of one rank group: stable DNS names for every rank before it is Ready."""
    name = rank_groups.group_name(child_name(owner, role.value), group)
    meta = _metadata(owner, role.value, name)
    meta["labels"][rank_groups.GROUP_LABEL] = str(group)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": _group_selector(owner, role, group),
            "ports": [
                {"name": "rendezvous", "port": contract.RENDEZVOUS_PORT, "targetPort": "rendezvous", "protocol": "TCP"}
            ],
        },
    }


def service(owner: Owner, spec: DeploymentSpec, role: Role) -> dict[str, Any]:
    """The gateway's client Service, or a worker pool's headless Service (metrics, `direct` KV data plane)."""
    port = contract.GATEWAY_PORT if role is Role.GATEWAY else contract.WORKER_PORT
    svc: dict[str, Any] = {
        "selector": labels(owner, role.value),
        "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
    }
    if role is Role.GATEWAY:
        svc["type"] = spec.gateway.service_type
    else:
        svc["clusterIP"] = "None"
        svc["publishNotReadyAddresses"] = False
    meta = _metadata(owner, role.value)
    meta["labels"][METRICS_LABEL] = "true"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": svc}


def pod_disruption_budget(owner: Owner, role: Role) -> dict[str, Any]:
    """Voluntary evictions (node drains) take at most one pod of a pool at a time.

    In a pool of groups one evicted pod restarts its group, which then counts as unavailable until it is back:
    the budget thus also keeps a drain from breaking two groups at once.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, role.value),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(owner, role.value)}},
    }


def service_monitor(owner: Owner) -> dict[str, Any]:
    """The Prometheus Operator's ServiceMonitor for the gateway and the worker pools."""
    return {
        "apiVersion": SERVICE_MONITOR_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, "metrics"),
        "spec": {
            "selector": {
                "matchLabels": {
                    "app.kubernetes.io/instance": owner.name,
                    "app.kubernetes.io/name": APP_NAME,
                    METRICS_LABEL: "true",
                }
            },
            "namespaceSelector": {"matchNames": [owner.namespace]},
            "endpoints": [{"port": "http", "path": contract.METRICS_PATH, "interval": "15s"}],
        },
    }


def redis_stateful_set(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    """The managed Redis: one pod, persistence off (queues and handoffs are transient by design)."""
    container = {
        "name": "redis",
        "image": spec.redis.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--port", str(REDIS_PORT)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": _resources(spec.redis.resources, {}),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": _container_security(),
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10, "failureThreshold": 3},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(owner, "redis"),
        "spec": {
            "replicas": 1,
            "serviceName": child_name(owner, "redis"),
            "selector": {"matchLabels": labels(owner, "redis")},
            "template": {
                "metadata": {"labels": _all_labels(owner, "redis")},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": REDIS_UID,
                        "runAsGroup": REDIS_UID,
                        "fsGroup": REDIS_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }


def redis_service(owner: Owner) -> dict[str, Any]:
    """The managed Redis's Service."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, "redis"),
        "spec": {
            "selector": labels(owner, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def worker_workloads(owner: Owner, spec: DeploymentSpec, role: Role, apis: ClusterApis) -> list[dict[str, Any]]:
    """The workloads of one worker pool, in the shape its `podsPerReplica` and the cluster call for."""
    kind = pool_shape(spec, role, apis)
    if kind is Shape.SINGLE:
        return [deployment(owner, spec, role)]
    if kind is Shape.LWS:
        return [leader_worker_set(owner, spec, role)]
    out: list[dict[str, Any]] = []
    for g in range(worker_pool(spec, role).replicas):
        out += [group_service(owner, role, g), group_stateful_set(owner, spec, role, g)]
    return out


def children(
    owner: Owner, spec: DeploymentSpec, default_image: str, apis: ClusterApis = ClusterApis()
) -> list[dict[str, Any]]:
    """Every child object of the deployment, in the order they are applied (config and Redis first)."""
    if spec.image is None:
        spec = spec.model_copy(update={"image": default_image})
    out = [config_map(owner, spec)]
    if spec.redis.managed:
        out += [redis_service(owner), redis_stateful_set(owner, spec)]
    out += [service(owner, spec, Role.GATEWAY), deployment(owner, spec, Role.GATEWAY)]
    out.append(pod_disruption_budget(owner, Role.GATEWAY))
    for role in (Role.PREFILL, Role.DECODE):
        out += [service(owner, spec, role), *worker_workloads(owner, spec, role, apis)]
        out.append(pod_disruption_budget(owner, role))
    if apis.service_monitor:
        out.append(service_monitor(owner))
    return out


def workload_keys(spec: DeploymentSpec) -> list[str]:
    """Components whose workloads decide readiness (the keys `status.compute_status` expects)."""
    keys = [role.value for role in Role]
    return [*keys, "redis"] if spec.redis.managed else keys
