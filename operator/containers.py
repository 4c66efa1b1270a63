"""The pieces every container and pod of a deployment is built from: resources, security, probes, placement."""

from __future__ import annotations

from typing import Any

from dsv4.operator.quantity import from_bytes, to_bytes
from dsv4.operator.spec import Resources, Scheduling

APP_UID = 1000  # the non-root user of the dsv4 image (Dockerfile)


def resources(res: Resources, extra: dict[str, str], shm_bytes: int = 0) -> dict[str, Any]:
    """A container's requests and limits: the user's, the device resources (`extra`) and a memory-backed /dev/shm."""
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


def container_security(add: tuple[str, ...] = ()) -> dict[str, Any]:
    """Non-root, read-only root filesystem, every capability dropped but `add`."""
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


def probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    """An HTTP GET probe."""
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def placement(base_selector: dict[str, str], base_tol: list[dict[str, Any]], sched: Scheduling) -> dict[str, Any]:
    """Node selector, tolerations and priority class: the accelerator profile's, then the pool's own."""
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


def pod_security(groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """The pod security context of the dsv4 image's user (`groups`: supplemental groups, e.g. HwHiAiUser)."""
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
