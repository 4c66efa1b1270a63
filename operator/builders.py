"""Spec → the child objects of a DeepSeekV4Deployment (docs/operator.md), as plain dicts ready for server-side apply.

Children: one ConfigMap (a config file per role); per role a Service + PodDisruptionBudget and its workload: the
gateway's Deployment, and for prefill and decode the workloads of their rank groups (`rank_groups`: a Deployment,
a LeaderWorkerSet, or a StatefulSet + headless Service per group); when `redis.managed`, a Redis StatefulSet +
Service; a ServiceMonitor when the cluster has that CRD. Every child carries the `app.kubernetes.io/*` labels and a
controller owner reference, so deleting the resource garbage-collects them. Each pod template is annotated with the
hash of its own role's config file only, so a change that concerns one pool rolls that pool alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv4.operator import rank_groups
from dsv4.operator.ownership import APP_NAME, Owner, child_name, labels, metadata
from dsv4.operator.pod_templates import gateway_template, worker_pool, worker_template
from dsv4.operator.rank_groups import Shape
from dsv4.operator.redis_children import redis_service, redis_stateful_set
from dsv4.operator.role_config import config_map
from dsv4.operator.spec import DeploymentSpec
from dsv4.protocol import contract
from dsv4.protocol.contract import Role

METRICS_LABEL = "dsv4.io/metrics"  # on the Services the ServiceMonitor scrapes
SERVICE_MONITOR_API_VERSION = "monitoring.coreos.com/v1"


@dataclass(frozen=True)
class ClusterApis:
    """Optional APIs the cluster serves; they decide the shape of some children."""

    leader_worker_set: bool = False
    service_monitor: bool = False


def pool_shape(spec: DeploymentSpec, role: Role, apis: ClusterApis) -> Shape:
    """How the replicas of a worker pool become workloads on this cluster."""
    return rank_groups.shape(worker_pool(spec, role).pods_per_replica, apis.leader_worker_set)


def deployment(owner: Owner, spec: DeploymentSpec, role: Role) -> dict[str, Any]:
    """The Deployment of the gateway, or of a worker pool whose replicas are single pods."""
    if role is Role.GATEWAY:
        replicas, template = spec.gateway.replicas, gateway_template(owner, spec)
    else:
        replicas, template = worker_pool(spec, role).replicas, worker_template(owner, spec, role, Shape.SINGLE)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, role.value),
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
        "metadata": metadata(owner, role.value),
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
                "workerTemplate": worker_template(owner, spec, role, Shape.LWS),
            },
        },
    }


def _group_selector(owner: Owner, role: Role, group: int) -> dict[str, str]:
    return {**labels(owner, role.value), rank_groups.GROUP_LABEL: str(group)}


def group_stateful_set(owner: Owner, spec: DeploymentSpec, role: Role, group: int) -> dict[str, Any]:
    """The StatefulSet of one rank group (no LWS): ordinal 0 leads; pods start together."""
    pool = worker_pool(spec, role)
    name = rank_groups.group_name(child_name(owner, role.value), group)
    meta = metadata(owner, role.value, name)
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
            "template": worker_template(owner, spec, role, Shape.STATEFULSETS, group),
        },
    }


def group_service(owner: Owner, role: Role, group: int) -> dict[str, Any]:
    """The headless Service of one rank group: stable DNS names for every rank before it is Ready."""
    name = rank_groups.group_name(child_name(owner, role.value), group)
    meta = metadata(owner, role.value, name)
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
    meta = metadata(owner, role.value)
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
        "metadata": metadata(owner, role.value),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(owner, role.value)}},
    }


def service_monitor(owner: Owner) -> dict[str, Any]:
    """The Prometheus Operator's ServiceMonitor for the gateway and the worker pools."""
    return {
        "apiVersion": SERVICE_MONITOR_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": metadata(owner, "metrics"),
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
