"""Observed children → `status` of a DeepSeekV4Deployment: phase, conditions, per-pool replicas, endpoint.

Pure functions over plain dicts as the API server returns them, so every branch is unit-tested without a cluster.
The `DeploymentStatus` model is also the status schema of the CRD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from dsv4.operator.spec import Base

Phase = Literal["Pending", "Progressing", "Ready", "Degraded"]


class Condition(Base):
    """A standard Kubernetes condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PoolStatus(Base):
    """Rank groups of one pool (a group is one pod when podsPerGroup is 1); `summary` is the printer column
    (`ready/desired` groups). A group is ready when every one of its pods is Ready."""

    desired: int = 0
    ready: int = 0
    updated: int = 0
    pods_per_group: int = 1
    summary: str = "0/0"


class PlannerPoolStatus(Base):
    """What the planner last did to one pool (survives operator restarts, so cooldowns do too)."""

    last_scale_time: str | None = None
    last_decision: str | None = None


class PlannerStatus(Base):
    """Planner memory per pool."""

    prefill: PlannerPoolStatus = Field(default_factory=PlannerPoolStatus)
    decode: PlannerPoolStatus = Field(default_factory=PlannerPoolStatus)


class PrefixPoolStats(Base):
    """One pool's prefix-cache counters, summed over its live workers since each started."""

    workers: int = 0
    prompt_tokens: int = 0  # tokens of the prompts looked up in the cache
    hit_tokens: int = 0  # ... of which taken from cached prefixes
    requests: int = 0
    hit_requests: int = 0
    computed_tokens: int = 0  # prefill tokens the engines computed


class PrefixCacheStatus(Base):
    """What the workers report of their prefix caches (read from Redis by the operator): `hitRate` is the share of
    prompt tokens taken from cached prefixes, over both pools (the `-o wide` column)."""

    hit_rate: str = "-"
    observed_at: str | None = None
    prefill: PrefixPoolStats = Field(default_factory=PrefixPoolStats)
    decode: PrefixPoolStats = Field(default_factory=PrefixPoolStats)


class DeploymentStatus(Base):
    """`status` of a DeepSeekV4Deployment."""

    observed_generation: int | None = None
    phase: Phase | None = None
    endpoint: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    gateway: PoolStatus | None = None
    prefill: PoolStatus | None = None
    decode: PoolStatus | None = None
    redis_ready: bool | None = None
    planner: PlannerStatus | None = None
    prefix_cache: PrefixCacheStatus | None = None


@dataclass(frozen=True)
class Workload:
    """What the operator reads from the workloads of one component (a Deployment, a StatefulSet, a LeaderWorkerSet
    or the StatefulSets of a pool's groups), counted in groups."""

    desired: int
    ready: int
    updated: int
    up_to_date: bool  # the workload controller has seen the latest template
    failure: str | None  # a controller-reported reason why it cannot progress
    pods_per_group: int = 1


@dataclass(frozen=True)
class Problem:
    """Something wrong with a spec that only the operator can tell; it becomes the Degraded condition."""

    reason: str
    message: str


def ready_pods(pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Pods that are Ready and not being deleted, per `app.kubernetes.io/component`."""
    out: dict[str, int] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        conditions = (pod.get("status") or {}).get("conditions") or []
        if meta.get("deletionTimestamp") or not any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
        ):
            continue
        component = (meta.get("labels") or {}).get("app.kubernetes.io/component", "")
        out[component] = out.get(component, 0) + 1
    return out


def read_workload(obj: Mapping[str, Any], ready_pods: int = 0) -> Workload:
    """The replica counts and failure reason of a Deployment, StatefulSet or LeaderWorkerSet as returned by the API
    server (a LeaderWorkerSet counts groups).

    `ready_pods` (Ready pods of that workload, counted by the operator) covers a workload controller whose status
    lags behind its pods: the larger of the two counts, at most the desired count, is what is ready.
    """
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    desired = int(spec.get("replicas", 1))
    generation = (obj.get("metadata") or {}).get("generation", 0)
    failure = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            failure = f"{cond.get('reason', 'ReplicaFailure')}: {cond.get('message', '')}".strip()
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            failure = f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip()
    return Workload(
        desired=desired,
        ready=max(int(status.get("readyReplicas", 0)), min(desired, ready_pods)),
        updated=int(status.get("updatedReplicas", 0)),
        up_to_date=status.get("observedGeneration", 0) >= generation,
        failure=failure,
    )


def endpoint_url(name: str, namespace: str, port: int) -> str:
    """In-cluster URL of the gateway Service."""
    return f"http://{name}-gateway.{namespace}.svc:{port}"


def pool_of_groups(groups: Sequence[Workload], desired: int, ready_groups: int, size: int) -> Workload:
    """A pool whose groups are workloads of their own (the StatefulSet fallback: one per group, each counting pods).

    `ready_groups` is counted from the pods (every pod of the group Ready); as for a single workload, the larger of
    that and what the workload controllers report is what is ready.
    """
    failures = [w.failure for w in groups if w.failure]
    by_controllers = sum(1 for w in groups if w.desired and w.ready >= w.desired)
    return Workload(
        desired=desired,
        ready=min(desired, max(ready_groups, by_controllers)),
        updated=min(desired, sum(1 for w in groups if w.updated >= w.desired)),
        up_to_date=all(w.up_to_date for w in groups),
        failure=failures[0] if failures else None,
        pods_per_group=size,
    )


def _pool(w: Workload | None) -> PoolStatus | None:
    if w is None:
        return None
    return PoolStatus(
        desired=w.desired,
        ready=w.ready,
        updated=w.updated,
        pods_per_group=w.pods_per_group,
        summary=f"{w.ready}/{w.desired}",
    )


def _condition(
    previous: Sequence[Mapping[str, Any]], type_: str, status: bool, reason: str, message: str, now: str, gen: int
) -> Condition:
    value: Literal["True", "False"] = "True" if status else "False"
    since = now
    for old in previous:
        if old.get("type") == type_ and old.get("status") == value:
            since = old.get("lastTransitionTime") or now
    return Condition(
        type=type_, status=value, reason=reason, message=message, last_transition_time=since, observed_generation=gen
    )


def compute_status(
    *,
    generation: int,
    workloads: Mapping[str, Workload | None],
    problems: Sequence[Problem],
    endpoint: str,
    now: str,
    previous_conditions: Sequence[Mapping[str, Any]] = (),
) -> DeploymentStatus:
    """The status for the observed children.

    `workloads` maps each expected child workload (gateway, prefill, decode, and redis when managed) to what was
    observed, or None when it does not exist yet. A pool with zero desired replicas counts as ready.
    """
    missing = sorted(k for k, w in workloads.items() if w is None)
    present = {k: w for k, w in workloads.items() if w is not None}
    not_ready = sorted(k for k, w in present.items() if w.ready < w.desired)
    rolling = sorted(k for k, w in present.items() if not w.up_to_date or w.updated < w.desired)
    failures = [f"{k}: {w.failure}" for k, w in sorted(present.items()) if w.failure]

    if problems:
        degraded = (True, problems[0].reason, "; ".join(p.message for p in problems))
    elif failures:
        degraded = (True, "WorkloadFailure", "; ".join(failures))
    else:
        degraded = (False, "AsExpected", "")
    if missing or rolling:
        progressing = (True, "Creating" if missing else "RollingOut", "waiting for " + ", ".join(missing + rolling))
    else:
        progressing = (False, "Stable", "")
    ready = not missing and not not_ready and not problems
    if ready:
        ready_c = (True, "AllPoolsReady", "")
    elif problems:
        ready_c = (False, "InvalidSpec", degraded[2])
    else:
        ready_c = (False, "PodsNotReady", "not ready: " + ", ".join(missing + not_ready))

    phase: Phase
    if degraded[0]:
        phase = "Degraded"
    elif ready:
        phase = "Ready"
    elif present and any(w.ready > 0 for w in present.values()):
        phase = "Progressing"
    else:
        phase = "Pending"
    conditions = [
        _condition(previous_conditions, t, *c, now=now, gen=generation)
        for t, c in (("Ready", ready_c), ("Progressing", progressing), ("Degraded", degraded))
    ]
    redis = workloads.get("redis")
    return DeploymentStatus(
        observed_generation=generation,
        phase=phase,
        endpoint=endpoint,
        conditions=conditions,
        gateway=_pool(workloads.get("gateway")),
        prefill=_pool(workloads.get("prefill")),
        decode=_pool(workloads.get("decode")),
        redis_ready=None if "redis" not in workloads else bool(redis and redis.ready >= redis.desired),
    )
