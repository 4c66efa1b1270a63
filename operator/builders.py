"""Spec → the child objects of a DeepSeekV4Deployment (docs/operator.md), as plain dicts ready for server-side apply.

Children: one ConfigMap (a config file per role), a Deployment + Service + PodDisruptionBudget per role (gateway,
prefill, decode) and, when `redis.managed`, a Redis StatefulSet + Service. Every child carries the
`app.kubernetes.io/*` labels and a controller owner reference, so deleting the resource garbage-collects them.
Each pod template is annotated with the hash of its own role's config file only, so a change that concerns one pool
rolls that pool alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import yaml

from dsv4.operator import api
from dsv4.operator.profiles import Profile, profile
from dsv4.operator.spec import DeploymentSpec, GatewaySpec, PoolSpec, Resources, Scheduling
from dsv4.protocol import contract, env
from dsv4.protocol.config import GatewayFile, WorkerFile
from dsv4.protocol.contract import Role

APP_NAME = "dsv4"
MANAGER = "dsv4-operator"
REDIS_PORT = 6379
REDIS_UID = 999  # the uid of the official redis image's `redis` user
APP_UID = 1000  # the non-root user of the dsv4 image (Dockerfile)
CONFIG_HASH_ANNOTATION = "dsv4.io/config-hash"
WORKER_GRACE_SECONDS = 300  # a worker finishes in-flight handoffs and generations before it exits
GATEWAY_GRACE_SECONDS = 60
# Released checkpoints take many minutes to load; the startup probe allows up to this long before liveness applies.
STARTUP_SECONDS = {"tiny": 300, "custom": 3600, "flash": 3600, "pro": 5400}


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
    if role is Role.GATEWAY:
        return GatewayFile(
            deployment=owner.name, served_model_name=served_model_name(spec), disaggregation=spec.disaggregation
        )
    pool = spec.prefill if role is Role.PREFILL else spec.decode
    return WorkerFile(deployment=owner.name, kv_handoff=spec.kv_handoff, parallelism=pool.parallelism)


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


def _resources(res: Resources, extra: dict[str, str]) -> dict[str, Any]:
    requests = {k: str(v) for k, v in res.requests.items()}
    limits = {k: str(v) for k, v in res.limits.items()}
    # Extended resources (devices) must be requested and limited alike.
    requests.update(extra)
    limits.update(extra)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
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


def _model_volume(spec: DeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    src = spec.model.source
    if src is None:
        return [], []
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
    return [volume], [mount]


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
    if spec.model.source is not None:
        out.append({"name": env.MODEL, "value": contract.MODEL_DIR})
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
    if role is Role.GATEWAY and spec.auth.api_key_secret_ref is not None:
        out.append({"name": env.API_KEY_FILE, "value": contract.API_KEY_FILE})
    return out


def _pod_template(owner: Owner, spec: DeploymentSpec, role: Role, pool: PoolSpec | GatewaySpec) -> dict[str, Any]:
    is_gateway = role is Role.GATEWAY
    # The gateway never touches a device: it runs on any node, whatever the workers' accelerator.
    prof = profile(spec.accelerator, pool.parallelism) if isinstance(pool, PoolSpec) else Profile(device="cpu")
    port = contract.GATEWAY_PORT if is_gateway else contract.WORKER_PORT
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
    if not is_gateway:
        model_volumes, model_mounts = _model_volume(spec)
        volumes += model_volumes + prof.volumes
        mounts += model_mounts + prof.mounts
        if prof.shm_size:
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": prof.shm_size}})
            mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if is_gateway and spec.auth.api_key_secret_ref is not None:
        ref = spec.auth.api_key_secret_ref
        volumes.append(
            {
                "name": "api-keys",
                "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "keys"}]},
            }
        )
        mounts.append({"name": "api-keys", "mountPath": contract.API_KEY_DIR, "readOnly": True})
    startup_failures = STARTUP_SECONDS[spec.model.variant] // 10
    container = {
        "name": role.value,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["dsv4", role.value],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": _env(owner, spec, role, prof.device) + prof.env,
        "resources": _resources(pool.resources, prof.resources),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        "startupProbe": _probe(contract.HEALTH_PATH, port, 10, max(startup_failures, 3)),
        "livenessProbe": _probe(contract.HEALTH_PATH, port, 10, 3),
        "readinessProbe": _probe(contract.READY_PATH, port, 5, 2),
    }
    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "fsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GATEWAY_GRACE_SECONDS if is_gateway else WORKER_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
        **_placement(prof.node_selector, prof.tolerations, pool.scheduling),
    }
    config_hash = hashlib.sha256(_config_text(owner, spec, role).encode()).hexdigest()[:16]
    return {
        "metadata": {
            "labels": _all_labels(owner, role.value),
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
        },
        "spec": pod_spec,
    }


def deployment(owner: Owner, spec: DeploymentSpec, role: Role) -> dict[str, Any]:
    """The Deployment of one role."""
    pools: dict[Role, PoolSpec | GatewaySpec] = {
        Role.GATEWAY: spec.gateway,
        Role.PREFILL: spec.prefill,
        Role.DECODE: spec.decode,
    }
    pool = pools[role]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, role.value),
        "spec": {
            "replicas": pool.replicas,
            "selector": {"matchLabels": labels(owner, role.value)},
            # Never go below the desired count during a rollout: a worker pod is expensive to lose, cheap to add.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": _pod_template(owner, spec, role, pool),
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
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(owner, role.value), "spec": svc}


def pod_disruption_budget(owner: Owner, role: Role) -> dict[str, Any]:
    """Voluntary evictions (node drains) take at most one pod of a pool at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, role.value),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(owner, role.value)}},
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


def children(owner: Owner, spec: DeploymentSpec, default_image: str) -> list[dict[str, Any]]:
    """Every child object of the deployment, in the order they are applied (config and Redis first)."""
    if spec.image is None:
        spec = spec.model_copy(update={"image": default_image})
    out = [config_map(owner, spec)]
    if spec.redis.managed:
        out += [redis_service(owner), redis_stateful_set(owner, spec)]
    for role in Role:
        out += [service(owner, spec, role), deployment(owner, spec, role), pod_disruption_budget(owner, role)]
    return out


def workload_keys(spec: DeploymentSpec) -> list[str]:
    """Components whose workloads decide readiness (the keys `status.compute_status` expects)."""
    keys = [role.value for role in Role]
    return [*keys, "redis"] if spec.redis.managed else keys
