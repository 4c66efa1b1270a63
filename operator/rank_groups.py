"""Rank groups: a prefill or decode replica is `podsPerReplica` pods that together hold the parallel layout.

Three shapes, chosen per pool (docs/operator.md):

- one pod per replica: a Deployment (every replica is independent; the planner picks which pod drains);
- several pods, LeaderWorkerSet CRD installed: one LeaderWorkerSet per pool, restarted group-wise by its controller;
- several pods, no LWS: one StatefulSet + headless Service per group, named `<name>-<role>-<g>`, restarted group-wise
  by the operator (`restarts`).

Every worker pod gets the rank env of `dsv4.protocol.env` (torchrun's names) so that its rank launcher can start one
rank per device and find the group's leader. Pure functions; the reconciler does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dsv4.protocol import contract, env

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
# Labels and env the LWS controller and its pod webhook put on every pod of a group.
LWS_GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
LWS_GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_LEADER_ADDRESS = "LWS_LEADER_ADDRESS"
LWS_WORKER_INDEX = "LWS_WORKER_INDEX"
# Ours, on the pods of the StatefulSet fallback; the StatefulSet controller labels each pod with its ordinal.
GROUP_LABEL = "dsv4.io/group"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# Put on every pod of a group the operator restarts, before it deletes them: a terminating pod carrying it is the
# operator's own doing and never triggers another restart.
RESTART_ANNOTATION = "dsv4.io/group-restart"
# The uids of the pods a group was formed with, written on each of them once all are there: a member replaced
# behind the operator's back (deleted and recreated between two looks) shows up as a uid that is gone.
MEMBERS_ANNOTATION = "dsv4.io/group-members"
HOSTNAME_KEY = "kubernetes.io/hostname"


class Shape(StrEnum):
    """How a pool's replicas become workloads."""

    SINGLE = "Deployment"  # one pod per replica
    LWS = "LeaderWorkerSet"
    STATEFULSETS = "StatefulSet"  # one per group


@dataclass(frozen=True)
class Layout:
    """The ranks of one group."""

    pods: int  # pods per group (podsPerReplica)
    ranks_per_pod: int  # env.NPROC_PER_NODE

    @property
    def world_size(self) -> int:
        """Ranks of the whole group (env.WORLD_SIZE)."""
        return self.pods * self.ranks_per_pod


def shape(pods_per_replica: int, lws_installed: bool) -> Shape:
    """The workload shape of a pool."""
    if pods_per_replica == 1:
        return Shape.SINGLE
    return Shape.LWS if lws_installed else Shape.STATEFULSETS


def group_name(pool_name: str, index: int) -> str:
    """The StatefulSet and headless Service of group `index` of the pool whose children are named `pool_name`."""
    return f"{pool_name}-{index}"


def leader_address(pool_name: str, index: int, namespace: str) -> str:
    """The stable DNS name of group `index`'s leader (ordinal 0) in the StatefulSet fallback."""
    name = group_name(pool_name, index)
    return f"{name}-0.{name}.{namespace}.svc"


def rank_env(kind: Shape, layout: Layout, leader: str | None = None) -> list[dict[str, Any]]:
    """The five rank variables of a worker pod. `leader` is the group leader's DNS name (StatefulSet fallback)."""
    fixed = [
        {"name": env.MASTER_PORT, "value": str(contract.RENDEZVOUS_PORT)},
        {"name": env.WORLD_SIZE, "value": str(layout.world_size)},
        {"name": env.NPROC_PER_NODE, "value": str(layout.ranks_per_pod)},
    ]
    if kind is Shape.SINGLE:
        # The pod is its own group: the leader is itself.
        return [{"name": env.MASTER_ADDR, "value": "127.0.0.1"}, {"name": env.NODE_RANK, "value": "0"}, *fixed]
    if kind is Shape.LWS:
        # The LWS pod webhook puts its variables first in the list, so $(...) expands to them.
        return [
            {"name": env.MASTER_ADDR, "value": f"$({LWS_LEADER_ADDRESS})"},
            {"name": env.NODE_RANK, "value": f"$({LWS_WORKER_INDEX})"},
            *fixed,
        ]
    if leader is None:
        raise ValueError("the StatefulSet fallback needs the leader's DNS name")
    ordinal = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}
    return [{"name": env.MASTER_ADDR, "value": leader}, {"name": env.NODE_RANK, "valueFrom": ordinal}, *fixed]


def affinity(kind: Shape, selector: Mapping[str, str], topology_key: str | None) -> dict[str, Any]:
    """Spread a group's pods over distinct nodes and, with `topology_key`, keep them inside one fabric domain.

    `selector` matches the pool's pods (plus the group label in the StatefulSet fallback); with LWS, each group is
    told apart by the group-key label its webhook sets (`matchLabelKeys`).
    """
    if kind is Shape.SINGLE:
        return {}

    def term(key: str) -> dict[str, Any]:
        t: dict[str, Any] = {"labelSelector": {"matchLabels": dict(selector)}, "topologyKey": key}
        if kind is Shape.LWS:
            t["matchLabelKeys"] = [LWS_GROUP_KEY_LABEL]
        return t

    out: dict[str, Any] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term(HOSTNAME_KEY)]}}
    if topology_key:
        out["podAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [term(topology_key)]}
    return out


def group_of(pod: Mapping[str, Any]) -> str | None:
    """The group a pod belongs to (its index within the pool), or None for a pod of a one-pod-per-replica pool."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(GROUP_LABEL, labels.get(LWS_GROUP_INDEX_LABEL))
    return None if value is None else str(value)


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def ready_groups(pods: Iterable[Mapping[str, Any]], size: int) -> int:
    """Groups whose `size` pods are all Ready and none is terminating (pods of one pool)."""
    ready: dict[str, int] = {}
    broken: set[str] = set()
    for pod in pods:
        g = group_of(pod)
        if g is None:
            continue
        if _terminating(pod) or not _ready(pod):
            broken.add(g)
        else:
            ready[g] = ready.get(g, 0) + 1
    return sum(1 for g, n in ready.items() if n >= size and g not in broken)


def _failure(pod: Mapping[str, Any]) -> str | None:
    """Why this pod breaks its group, or None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None if RESTART_ANNOTATION in (meta.get("annotations") or {}) else "was deleted"
    if status.get("phase") == "Failed":
        return f"failed ({status.get('reason') or 'phase Failed'})"
    for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        if int(c.get("restartCount") or 0) > 0:
            return f"container {c.get('name')} restarted"
    return None


def _members(pod: Mapping[str, Any]) -> set[str] | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(MEMBERS_ANNOTATION)
    return None if value is None else set(value.split(","))


def _uid(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("uid", ""))


def _name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name", ""))


PodRef = tuple[str, str]  # (name, uid): StatefulSet pods reuse names, so every action names the uid too


@dataclass(frozen=True)
class Restart:
    """A group to restart as a unit: mark every pod, then delete the ones not already terminating."""

    group: str
    reason: str
    mark: list[PodRef]  # every pod of the group (terminating ones too, so they trigger nothing more)
    delete: list[PodRef]  # the pods of the broken group still running


def _fallback_groups(pods: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        g = group_of(pod)
        if g is not None and GROUP_LABEL in ((pod.get("metadata") or {}).get("labels") or {}):
            by_group.setdefault(g, []).append(pod)
    return dict(sorted(by_group.items()))


def restarts(pods: Iterable[Mapping[str, Any]]) -> list[Restart]:
    """The groups of the StatefulSet fallback that must restart because one of their pods failed.

    All-or-nothing: a rank that died leaves its peers blocked in a collective, so the whole group goes. A pod the
    operator itself deleted (marked with RESTART_ANNOTATION) triggers nothing; its replacement starts fresh. A member
    replaced before the operator saw it go is caught by the membership annotation: the pods that still list the old
    member go, the new ones stay.
    """
    out = []
    for g, members in _fallback_groups(pods).items():
        live = [m for m in members if not (m.get("metadata") or {}).get("deletionTimestamp")]
        uids = {_uid(m) for m in live}
        failures = [(_name(m), why) for m in members if (why := _failure(m)) is not None]
        stale = [m for m in live if (known := _members(m)) is not None and not known <= uids]
        if failures:
            name, why = failures[0]
            going = live
        elif stale:
            newcomers = sorted(_name(m) for m in live if _members(m) is None)
            name, why = ", ".join(newcomers) or _name(stale[0]), "replaced a member of the running group"
            going = stale
        else:
            continue
        gone = {_uid(m) for m in going}
        out.append(
            Restart(
                group=g,
                reason=f"pod {name} {why}",
                mark=sorted((_name(m), _uid(m)) for m in members if _uid(m) in gone or m not in live),
                delete=sorted((_name(m), _uid(m)) for m in going),
            )
        )
    return out


def memberships(pods: Iterable[Mapping[str, Any]], size: int) -> dict[PodRef, str]:
    """The membership annotation to write, per pod, for complete healthy groups of the StatefulSet fallback whose
    pods do not all carry it yet (run after `restarts`: a group with a stale member is restarted, not joined)."""
    out: dict[PodRef, str] = {}
    for members in _fallback_groups(pods).values():
        if len(members) != size or any((m.get("metadata") or {}).get("deletionTimestamp") for m in members):
            continue
        uids = {_uid(m) for m in members}
        value = ",".join(sorted(uids))
        if any((known := _members(m)) is not None and known != uids for m in members):
            continue
        out.update({(_name(m), _uid(m)): value for m in members if _members(m) != uids})
    return out
