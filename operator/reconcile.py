"""One reconcile pass and one status refresh, over `Kube` and the pure builders; kopf-free so it can be reused by
the handlers, the planner and the tests. Idempotent: children have fixed names and are server-side applied, so a
pass interrupted anywhere converges on the next one with no duplicates.

Both passes also look after the rank groups (`tend_groups`): a group of the StatefulSet fallback whose pod failed is
restarted as a unit, and every Ascend pod gets its group's HCCL rank table once the group's devices are known.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dsv4.operator import builders, checks, ownership, pod_templates, rank_groups, rank_table
from dsv4.operator.builders import ClusterApis
from dsv4.operator.kube import LWS_KIND, WORKLOAD_KINDS, Kube
from dsv4.operator.ownership import Owner
from dsv4.operator.profiles import profile
from dsv4.operator.rank_groups import Shape
from dsv4.operator.spec import DeploymentSpec
from dsv4.operator.status import (
    DeploymentStatus,
    Problem,
    Workload,
    compute_status,
    endpoint_url,
    pool_of_groups,
    read_workload,
    ready_pods,
)
from dsv4.protocol import contract
from dsv4.protocol.contract import Role

log = logging.getLogger(__name__)

# post(type, reason, message): a Kubernetes Event on the DeepSeekV4Deployment.
Post = Callable[[str, str, str], None]
WORKLOADS = {kind for _, kind in WORKLOAD_KINDS} | {rank_groups.LWS_KIND}
# Children are independent objects: applying them in parallel cuts a reconcile to about two round trips. The pool is
# shared by every reconcile in flight, so a burst of new resources keeps it busy.
_appliers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsv4-apply")


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


def _component(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", ""))


def problems_of(kube: Kube, namespace: str, spec: DeploymentSpec) -> list[Problem]:
    """Everything wrong that CEL could not catch, including references to missing Secrets."""
    refs = checks.reference_problems(spec, lambda name, key: kube.secret_has_key(namespace, name, key))
    return checks.spec_problems(spec) + refs


def _pool_workload(
    owner: Owner,
    spec: DeploymentSpec,
    apis: ClusterApis,
    role: Role,
    objs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> Workload | None:
    """A worker pool's workloads, counted in groups; None while one of them does not exist yet."""
    pool = pod_templates.worker_pool(spec, role)
    kind = builders.pool_shape(spec, role, apis)
    mine = [o for o in objs if o["kind"] == kind.value]
    if kind is Shape.SINGLE:
        return read_workload(mine[0], ready_pods(pods).get(role.value, 0)) if mine else None
    groups = rank_groups.ready_groups(pods, pool.pods_per_replica)
    if kind is Shape.LWS:
        if not mine:
            return None
        w = read_workload(mine[0])
        return dataclasses.replace(w, ready=min(w.desired, max(w.ready, groups)), pods_per_group=pool.pods_per_replica)
    base = ownership.child_name(owner, role.value)
    wanted = {rank_groups.group_name(base, g) for g in range(pool.replicas)}
    found = [o for o in mine if o["metadata"]["name"] in wanted]
    if len(found) < len(wanted):
        return None
    return pool_of_groups([read_workload(o) for o in found], pool.replicas, groups, pool.pods_per_replica)


def _workloads(
    owner: Owner, spec: DeploymentSpec, apis: ClusterApis, objs: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> dict[str, Workload | None]:
    """Each component's workload as the status counts it: pods for the gateway and Redis, groups for the pools."""
    by_component: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        if o["kind"] in WORKLOADS:
            by_component.setdefault(_component(o), []).append(o)
    pods_of: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        pods_of.setdefault(_component(p), []).append(p)
    ready = ready_pods(pods)
    out: dict[str, Workload | None] = {}
    for key in builders.workload_keys(spec):
        found = by_component.get(key, [])
        if key in (Role.PREFILL.value, Role.DECODE.value):
            out[key] = _pool_workload(owner, spec, apis, Role(key), found, pods_of.get(key, []))
        else:
            out[key] = read_workload(found[0], ready.get(key, 0)) if found else None
    return out


def _status(
    body: Mapping[str, Any],
    spec: DeploymentSpec | None,
    apis: ClusterApis,
    problems: list[Problem],
    objs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> DeploymentStatus:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("conditions") or []
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    return compute_status(
        generation=int(meta.get("generation", 0)),
        workloads=_workloads(owner, spec, apis, objs, pods) if spec is not None else {},
        problems=problems,
        endpoint=endpoint_url(meta["name"], meta["namespace"], contract.GATEWAY_PORT),
        now=now_iso(),
        previous_conditions=previous,
    )


def status_patch(status: DeploymentStatus) -> dict[str, Any]:
    """The merge patch writing `status` (the planner's memory and the prefix-cache figures, which their own loops
    write, are left alone; fields now unset are removed)."""
    patch: dict[str, Any] = status.model_dump(by_alias=True, exclude={"planner", "prefix_cache"}, mode="json")
    return patch


def _restart_groups(
    kube: Kube, owner: Owner, role: Role, pods: list[dict[str, Any]], replicas: int, size: int, post: Post
) -> None:
    # Groups beyond the wanted count are being removed whole: their terminating pods are no failure.
    wanted = [p for p in pods if int(rank_groups.group_of(p) or 0) < replicas]
    restarted = set()
    for restart in rank_groups.restarts(wanted):
        restarted.add(restart.group)
        post("Warning", "GroupRestart", f"{role.value} group {restart.group} restarts as a unit: {restart.reason}")
        for name, uid in restart.mark:
            kube.annotate_pod(owner.namespace, name, {rank_groups.RESTART_ANNOTATION: restart.reason[:200]}, uid)
        for name, uid in restart.delete:
            kube.delete_pod(owner.namespace, name, uid)
    healthy = [p for p in wanted if rank_groups.group_of(p) not in restarted]
    for (name, uid), members in rank_groups.memberships(healthy, size).items():
        kube.annotate_pod(owner.namespace, name, {rank_groups.MEMBERS_ANNOTATION: members}, uid)


def _node_rank(pod: Mapping[str, Any]) -> int:
    # An LWS leader's StatefulSet ordinal is its group index: the LWS worker index comes first.
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(rank_groups.LWS_WORKER_INDEX_LABEL, labels.get(rank_groups.POD_INDEX_LABEL, "0"))
    return int(value)


def _write_rank_tables(kube: Kube, owner: Owner, pods: list[dict[str, Any]], size: int, post: Post) -> None:
    groups: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        if not (pod.get("metadata") or {}).get("deletionTimestamp"):
            groups.setdefault(rank_groups.group_of(pod) or pod["metadata"]["name"], []).append(pod)
    for members in groups.values():
        try:
            text = rank_table.render(rank_table.table([rank_table.member(p, _node_rank(p)) for p in members], size))
        except rank_table.RankTableError as err:
            post("Warning", "RankTableInvalid", str(err))
            continue
        for pod in members:
            meta = pod["metadata"]
            if (meta.get("annotations") or {}).get(rank_table.TABLE_ANNOTATION) != text:
                kube.annotate_pod(owner.namespace, meta["name"], {rank_table.TABLE_ANNOTATION: text}, meta.get("uid"))


def tend_groups(
    kube: Kube, owner: Owner, spec: DeploymentSpec, apis: ClusterApis, pods: list[dict[str, Any]], post: Post
) -> None:
    """Restart broken groups of the StatefulSet fallback; keep the Ascend pods' rank tables up to date."""
    for role in (Role.PREFILL, Role.DECODE):
        pool = pod_templates.worker_pool(spec, role)
        mine = [p for p in pods if _component(p) == role.value]
        if builders.pool_shape(spec, role, apis) is Shape.STATEFULSETS:
            _restart_groups(kube, owner, role, mine, pool.replicas, pool.pods_per_replica, post)
        if profile(spec.accelerator, pool).rank_table:
            _write_rank_tables(kube, owner, mine, pool.pods_per_replica, post)


def _post_changes(post: Post, created: list[str], updated: list[str], deleted: list[str]) -> None:
    # One Event per kind of change and pass, not one per child: a burst of new resources would otherwise post
    # a dozen Events each.
    for reason, verb, names in (("Created", "created", created), ("Updated", "updated to the new spec", updated)):
        if names:
            post("Normal", reason, f"{verb}: {', '.join(names)}")
    if deleted:
        post("Normal", "Deleted", f"deleted (no longer part of the spec): {', '.join(deleted)}")


def reconcile(
    kube: Kube, body: Mapping[str, Any], default_image: str, post: Post, first: bool = False
) -> DeploymentStatus:
    """Bring the children in line with the spec, delete children no longer wanted, and write the status.

    `first`: the resource's first pass (kopf's create). Nothing of an older spec can exist then, so the children are
    not listed: a burst of new resources spends its API calls on creating, not on finding nothing. (A pass cut short
    before may have made some of them: applying them again is what server-side apply is for.)
    """
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    owner = Owner(name, namespace, uid)
    apis = kube.cluster_apis()
    spec, problems = checks.parse(body.get("spec") or {})
    listed = [] if first else kube.list_children(namespace, name)
    existing = {_key(o): o for o in listed if _owned_by(o, uid)}
    if spec is None:
        status = _status(body, None, apis, problems, list(existing.values()), [])
        kube.patch_status(namespace, name, status_patch(status))
        post("Warning", problems[0].reason, problems[0].message)
        return status
    problems += problems_of(kube, namespace, spec)
    for p in problems:
        post("Warning", p.reason, p.message)
    applied: list[dict[str, Any]] = []
    created: list[str] = []
    updated: list[str] = []
    wanted = builders.children(owner, spec, default_image, apis)
    for obj, after in zip(wanted, _appliers.map(kube.apply, wanted), strict=True):
        after.setdefault("kind", obj["kind"])
        before = existing.get(_key(obj))
        label = f"{obj['kind']} {obj['metadata']['name']}"
        if before is None:
            created.append(label)
        elif _changed(before, after):
            updated.append(label)
        applied.append(after)
    deleted = []
    for key in sorted(existing.keys() - {_key(o) for o in wanted}):
        kube.delete(existing[key])
        deleted.append(f"{key[0]} {key[1]}")
    _post_changes(post, created, updated, deleted)
    # A first pass made the workloads just now: they have no pods yet worth reading.
    pods = [] if first else kube.list_pods(namespace, name)
    tend_groups(kube, owner, spec, apis, pods, post)
    status = _status(body, spec, apis, problems, applied, pods)
    kube.patch_status(namespace, name, status_patch(status))
    return status


@dataclass(frozen=True)
class Seen:
    """What the operator's watches last saw of one resource: its body, its Deployments and StatefulSets, its pods."""

    body: dict[str, Any] | None
    workloads: list[dict[str, Any]]
    pods: list[dict[str, Any]]


def refresh_status(
    kube: Kube,
    namespace: str,
    name: str,
    poster: Callable[[Mapping[str, Any]], Post] | None = None,
    seen: Seen | None = None,
) -> DeploymentStatus | None:
    """Tend the groups and recompute the status from the children as they are now; patch only when it changed.

    `poster(body)` gives the Event poster of the resource (none: problems are only logged). With `seen`, the
    resource, its Deployments/StatefulSets and its pods come from the watches instead of the API server (only a
    LeaderWorkerSet, which no watch covers, is read).
    """
    body = kube.get_resource(namespace, name) if seen is None else seen.body
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    apis = kube.cluster_apis()
    spec, problems = checks.parse(body.get("spec") or {})
    if spec is not None:
        problems += problems_of(kube, namespace, spec)
    uid = body["metadata"]["uid"]
    if seen is None:
        # Only the workloads decide the status: a few lists, not every kind, on every pod change.
        kinds = kube.child_kinds(workloads_only=True)
        objs = [o for o in kube.list_children(namespace, name, kinds) if _owned_by(o, uid)]
        pods = kube.list_pods(namespace, name)
    else:
        objs = [o for o in seen.workloads if _owned_by(o, uid)]
        if apis.leader_worker_set:
            objs += [o for o in kube.list_children(namespace, name, (LWS_KIND,)) if _owned_by(o, uid)]
        pods = seen.pods
    if spec is not None:
        post = poster(body) if poster is not None else _log_only
        tend_groups(kube, Owner(name, namespace, uid), spec, apis, pods, post)
    status = _status(body, spec, apis, problems, objs, pods)
    patch = status_patch(status)
    current = body.get("status") or {}
    if any(current.get(k) != v for k, v in patch.items()):
        kube.patch_status(namespace, name, patch)
    return status


def _log_only(type_: str, reason: str, message: str) -> None:
    log.warning("%s %s: %s", type_, reason, message)
