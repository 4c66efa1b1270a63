"""The managed Redis (`redis.managed`): its StatefulSet and Service, and the URL every role connects to."""

from __future__ import annotations

from typing import Any

from dsv4.operator.containers import container_security, resources
from dsv4.operator.ownership import Owner, all_labels, child_name, labels, metadata
from dsv4.operator.spec import DeploymentSpec
from dsv4.protocol import contract

REDIS_PORT = 6379
REDIS_UID = 999  # the uid of the official redis image's `redis` user


def redis_url(owner: Owner, spec: DeploymentSpec) -> str:
    """The Redis every role connects to: the managed one's Service, or the user's URL."""
    if spec.redis.managed:
        return f"redis://{child_name(owner, 'redis')}.{owner.namespace}.svc:{REDIS_PORT}/0"
    assert spec.redis.url is not None  # CEL: managed xor url
    return spec.redis.url


def redis_maxclients(spec: DeploymentSpec) -> int:
    """Clients the managed Redis admits: every gateway replica's pool (each request in flight holds a connection
    while it waits for tokens) on top of Redis's default for the workers and everything else."""
    return spec.gateway.max_replicas * contract.GATEWAY_REDIS_CONNECTIONS + contract.REDIS_DEFAULT_MAXCLIENTS


def redis_stateful_set(owner: Owner, spec: DeploymentSpec) -> dict[str, Any]:
    """The managed Redis: one pod, persistence off (queues and handoffs are transient by design)."""
    container = {
        "name": "redis",
        "image": spec.redis.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": [
            *("--save", "", "--appendonly", "no", "--protected-mode", "no", "--port", str(REDIS_PORT)),
            *("--maxclients", str(redis_maxclients(spec))),
        ],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": resources(spec.redis.resources, {}),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": container_security(),
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 10, "failureThreshold": 3},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(owner, "redis"),
        "spec": {
            "replicas": 1,
            "serviceName": child_name(owner, "redis"),
            "selector": {"matchLabels": labels(owner, "redis")},
            "template": {
                "metadata": {"labels": all_labels(owner, "redis")},
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
        "metadata": metadata(owner, "redis"),
        "spec": {
            "selector": labels(owner, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }
