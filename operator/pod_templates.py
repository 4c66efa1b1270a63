"""The pod templates of the gateway and of the prefill and decode pools."""

from __future__ import annotations

import hashlib
from typing import Any

from dsv4.operator import rank_groups, rank_table
from dsv4.operator.containers import container_security, placement, pod_security, probe, resources
from dsv4.operator.ownership import Owner, all_labels, child_name, labels
from dsv4.operator.profiles import Profile, profile
from dsv4.operator.rank_groups import Layout, Shape
from dsv4.operator.redis_children import redis_url
from dsv4.operator.role_config import config_text
from dsv4.operator.spec import DeploymentSpec, PoolSpec
from dsv4.operator.worker_model import gateway_reads_checkpoint, source_volume, worker_model
from dsv4.protocol import contract, env
from dsv4.protocol.contract import Role

CONFIG_HASH_ANNOTATION = "dsv4.io/config-hash"
# After its drain timeout a worker still flushes telemetry and closes its connections before SIGKILL.
EXIT_MARGIN_SECONDS = 15
GATEWAY_GRACE_SECONDS = 60
# Endpoint controllers and load balancers drop a terminating gateway pod within a few seconds; until then it must
# keep accepting, so it sleeps before its SIGTERM (uvicorn then finishes open streams for up to 30 s).
GATEWAY_PRESTOP_SECONDS = 5
# Released checkpoints take many minutes to load; the startup probe allows up to this long before liveness applies.
STARTUP_SECONDS = {"tiny": 300, "custom": 3600, "flash": 3600, "pro": 5400}


def base_env(owner: Owner, spec: DeploymentSpec, role: Role, device: str) -> list[dict[str, Any]]:
    """The env every container of a role's pod gets: deployment, role, Redis, device, pod identity, telemetry."""
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
    config_hash = hashlib.sha256(config_text(owner, spec, role).encode()).hexdigest()[:16]
    return {
        CONFIG_HASH_ANNOTATION: config_hash,
        # For Prometheus set-ups that discover pods by annotation (the ServiceMonitor covers the Operator's).
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": contract.METRICS_PATH,
    }


def gateway_template(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    """The gateway's pod template."""
    role, port = Role.GATEWAY, contract.GATEWAY_PORT
    volumes, mounts = _common_volumes(owner, role)
    container_env = base_env(owner, spec, role, "cpu")
    if gateway_reads_checkpoint(spec):
        volume, mount = source_volume(spec)
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
        "resources": resources(spec.gateway.resources, {}),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        "startupProbe": probe(contract.HEALTH_PATH, port, 5, 24),
        "livenessProbe": probe(contract.HEALTH_PATH, port, 10, 3),
        "readinessProbe": probe(contract.READY_PATH, port, 5, 2),
        "lifecycle": {"preStop": {"sleep": {"seconds": GATEWAY_PRESTOP_SECONDS}}},
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security(),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GATEWAY_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
        # The gateway never touches a device: it runs on any node, whatever the workers' accelerator.
        **placement({}, [], spec.gateway.scheduling),
    }
    return {
        "metadata": {
            "labels": all_labels(owner, role.value),
            "annotations": _pod_annotations(owner, spec, role, port),
        },
        "spec": pod_spec,
    }


def worker_pool(spec: DeploymentSpec, role: Role) -> PoolSpec:
    """The pool spec of a worker role."""
    if role is Role.GATEWAY:
        raise ValueError("the gateway is not a worker pool")
    return spec.prefill if role is Role.PREFILL else spec.decode


def layout(spec: DeploymentSpec, role: Role) -> Layout:
    """The ranks of one group of a worker pool."""
    pool = worker_pool(spec, role)
    return Layout(pods=pool.pods_per_replica, ranks_per_pod=profile(spec.accelerator, pool).ranks_per_pod)


def worker_template(
    owner: Owner, spec: DeploymentSpec, role: Role, kind: Shape, group: int | None = None
) -> dict[str, Any]:
    """The pod template of a prefill or decode pool (`group`: the group index in the StatefulSet fallback)."""
    pool = worker_pool(spec, role)
    prof: Profile = profile(spec.accelerator, pool)
    port = contract.WORKER_PORT
    volumes, mounts = _common_volumes(owner, role)
    pod_labels = all_labels(owner, role.value)
    selector = labels(owner, role.value)
    leader = None
    if group is not None:
        pod_labels[rank_groups.GROUP_LABEL] = str(group)
        selector = {**selector, rank_groups.GROUP_LABEL: str(group)}
        leader = rank_groups.leader_address(child_name(owner, role.value), group, owner.namespace)
    container_env = [
        *base_env(owner, spec, role, prof.device),
        *rank_groups.rank_env(kind, layout(spec, role), leader),
        {"name": env.DRAIN_TIMEOUT_S, "value": str(pool.drain_seconds)},
        *prof.env,
    ]
    security = container_security(prof.add_capabilities)
    base = {
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": container_env,
        "securityContext": security,
        "volumeMounts": list(mounts),
    }
    model = worker_model(spec, base)
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
        "resources": resources(pool.resources, prof.resources, prof.shm_bytes),
        "volumeMounts": mounts,
        "startupProbe": probe(contract.HEALTH_PATH, port, 10, max(startup_failures, 3)),
        "livenessProbe": probe(contract.HEALTH_PATH, port, 10, 3),
        # /readyz answers 200 once all of the pod's ranks joined the group and one warm-up step ran.
        "readinessProbe": probe(contract.READY_PATH, port, 5, 2),
    }
    pod_spec: dict[str, Any] = {
        "securityContext": pod_security(prof.supplemental_groups),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": pool.drain_seconds + EXIT_MARGIN_SECONDS,
        "initContainers": model.init_containers,
        "containers": [container],
        "volumes": volumes,
        **placement(prof.node_selector, prof.tolerations, pool.scheduling),
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    group_affinity = rank_groups.affinity(kind, selector, prof.topology_key)
    if group_affinity:
        pod_spec["affinity"] = group_affinity
    return {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec}
