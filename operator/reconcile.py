"""One reconcile pass and one status refresh, over `Kube` and the pure builders; kopf-free so it can be reused by
the handlers, the planner and the tests. Idempotent: children have fixed names and are server-side applied, so a
pass interrupted anywhere converges on the next one with no duplicates.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dsv4.operator import builders, checks
from dsv4.operator.builders import Owner
from dsv4.operator.kube import WORKLOAD_KINDS, Kube
from dsv4.operator.spec import DeploymentSpec
from dsv4.operator.status import (
    DeploymentStatus,
    Problem,
    Workload,
    compute_status,
    endpoint_url,
    read_workload,
    ready_pods,
)
from dsv4.protocol import contract

# post(type, reason, message): a Kubernetes Event on the DeepSeekV4Deployment.
Post = Callable[[str, str, str], None]
# Children are independent objects: applying them in parallel cuts a reconcile from 12 round trips to about 2.
_appliers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dsv4-apply")


def now_iso() -> str:
    """The current time as Kubernetes writes it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    # Workload status churns resourceVersion; generation moves only when the spec does.
    b, a = before["metadata"], after["metadata"]
    if "generation" in a and a.get("generation") is not None:
        return bool(b.get("generation") != a.get("generation"))
    return bool(b.get("resourceVersion") != a.get("resourceVersion"))


def problems_of(kube: Kube, namespace: str, spec: DeploymentSpec) -> list[Problem]:
    """Everything wrong that CEL could not catch, including references to missing Secrets."""
    refs = checks.reference_problems(spec, lambda name, key: kube.secret_has_key(namespace, name, key))
    return checks.spec_problems(spec) + refs


def _workloads(
    spec: DeploymentSpec, objs: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> dict[str, Workload | None]:
    ready = ready_pods(pods)
    found = {}
    for o in objs:
        if o["kind"] in {kind for _, kind in WORKLOAD_KINDS}:
            component = o["metadata"]["labels"].get("app.kubernetes.io/component")
            found[component] = read_workload(o, ready.get(component, 0))
    return {k: found.get(k) for k in builders.workload_keys(spec)}


def _status(
    body: Mapping[str, Any],
    spec: DeploymentSpec | None,
    problems: list[Problem],
    objs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> DeploymentStatus:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions") or []
    return compute_status(
        generation=int(meta.get("generation", 0)),
        workloads=_workloads(spec, objs, pods) if spec is not None else {},
        problems=problems,
        endpoint=endpoint_url(meta["name"], meta["namespace"], contract.GATEWAY_PORT),
        now=now_iso(),
        previous_conditions=previous,
    )


def status_patch(status: DeploymentStatus) -> dict[str, Any]:
    """The merge patch writing `status` (the planner's memory is left alone; fields now unset are removed)."""
    patch: dict[str, Any] = status.model_dump(by_alias=True, exclude={"planner"}, mode="json")
    return patch


def reconcile(kube: Kube, body: Mapping[str, Any], default_image: str, post: Post) -> DeploymentStatus:
    """Bring the children in line with the spec, delete children no longer wanted, and write the status."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec, problems = checks.parse(body.get("spec") or {})
    existing = {_key(o): o for o in kube.list_children(namespace, name) if _owned_by(o, uid)}
    if spec is None:
        status = _status(body, None, problems, list(existing.values()), [])
        kube.patch_status(namespace, name, status_patch(status))
        post("Warning", problems[0].reason, problems[0].message)
        return status
    problems += problems_of(kube, namespace, spec)
    for p in problems:
        post("Warning", p.reason, p.message)
    applied: list[dict[str, Any]] = []
    wanted = builders.children(Owner(name, namespace, uid), spec, default_image)
    for obj, after in zip(wanted, _appliers.map(kube.apply, wanted), strict=True):
        after.setdefault("kind", obj["kind"])
        before = existing.get(_key(obj))
        if before is None:
            post("Normal", "Created", f"created {obj['kind']} {obj['metadata']['name']}")
        elif _changed(before, after):
            post("Normal", "Updated", f"updated {obj['kind']} {obj['metadata']['name']} to the new spec")
        applied.append(after)
    for key in existing.keys() - {_key(o) for o in wanted}:
        kube.delete(existing[key])
        post("Normal", "Deleted", f"deleted {key[0]} {key[1]}: no longer part of the spec")
    status = _status(body, spec, problems, applied, kube.list_pods(namespace, name))
    kube.patch_status(namespace, name, status_patch(status))
    return status


def refresh_status(kube: Kube, namespace: str, name: str) -> DeploymentStatus | None:
    """Recompute the status from the children as they are now; patch only when it changed."""
    body = kube.get_resource(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    spec, problems = checks.parse(body.get("spec") or {})
    if spec is not None:
        problems += problems_of(kube, namespace, spec)
    uid = body["metadata"]["uid"]
    # Only the workloads decide the status: two lists, not five, on every pod change.
    objs = [o for o in kube.list_children(namespace, name, WORKLOAD_KINDS) if _owned_by(o, uid)]
    status = _status(body, spec, problems, objs, kube.list_pods(namespace, name))
    patch = status_patch(status)
    current = body.get("status") or {}
    if any(current.get(k) != v for k, v in patch.items()):
        kube.patch_status(namespace, name, patch)
    return status
