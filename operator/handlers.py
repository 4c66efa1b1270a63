"""kopf handlers: thin wiring of cluster events to `reconcile.py` and `autoscaler.py`.

- create / update / resume: reconcile (apply children, delete unwanted ones, write status, post Events);
- child Deployment / StatefulSet / pod changes: refresh the owner's status (Ready follows the pods), restart broken
  rank groups of the StatefulSet fallback and write the Ascend rank tables (`reconcile.tend_groups`);
- one ticker for all resources: drift repair every RESYNC_S, a status poll every STATUS_POLL_S, and the planner when
  `spec.autoscaling.enabled` (not a kopf timer per resource: kopf puts a finalizer on every resource it times, one
  more write and event round trip per new resource);
- delete: children go by garbage collection (owner references); the handler only records it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf

from dsv4.operator import api, autoscaler, prefix_status, reconcile
from dsv4.operator.kube import Kube
from dsv4.operator.ownership import MANAGER
from dsv4.protocol import env

DEFAULT_IMAGE = "ghcr.io/dsv4/dsv4:0.1.0"
TICK_S = 5.0  # timer granularity; the planner runs every spec.autoscaling.intervalSeconds
RESYNC_S = 60.0  # repair drift (a child edited or deleted by hand) at least this often
# Watch events can lag far behind the API server's state when it is overloaded (seen in the test cluster, where
# the ReplicaSet controller missed pod updates for minutes); a cheap poll bounds how stale the status gets.
STATUS_POLL_S = 20.0
# Child events arrive in bursts (a new deployment's pods are created, scheduled and made ready within a second or
# two; a rollout sends dozens): one status refresh per burst. Measured with 50 new resources at once, a shorter
# delay spent a third of all API calls on refreshes (bench/operator_reconcile.py, docs/operator.md).
REFRESH_DELAY_S = 2.0

Key = tuple[str, str]  # (namespace, name) of a DeepSeekV4Deployment

_refresh_pending: set[Key] = set()
_background: set[asyncio.Task[None]] = set()
# Resources whose reconcile is running: it writes their status itself, so a refresh waits for it.
_reconciling: set[Key] = set()
# The latest body of every resource, as the watch delivers it, and the ticker's memory per resource.
_resources: dict[Key, dict[str, Any]] = {}
_memos: dict[Key, dict[str, Any]] = {}
_ticking: set[Key] = set()
_ticker_started = False
log = logging.getLogger("dsv4.operator")

_kube: Kube | None = None
_kube_lock = threading.Lock()


def kube() -> Kube:
    """The shared API client, connected on first use (handlers start in several threads at once)."""
    global _kube
    with _kube_lock:
        if _kube is None:
            _kube = Kube.connect()
        return _kube


def default_image() -> str:
    """The image for pods whose spec names none: the operator's own (the chart sets DSV4_IMAGE)."""
    return os.environ.get(env.IMAGE, DEFAULT_IMAGE)


def _poster(body: Mapping[str, Any]) -> reconcile.Post:
    def post(type_: str, reason: str, message: str) -> None:
        # kopf reads only apiVersion, kind and metadata of the body: a plain mapping does.
        kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message[:1000])

    return post


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations: the status schema is structural and would prune it."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP)
    # No handler needs one any more; resources made by older versions still carry it, and kopf removes it.
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's would repeat them
    settings.execution.max_workers = 16
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    settings.networking.request_timeout = 30
    # Status refreshes and the timer run blocking API calls through asyncio.to_thread; the default pool (cores + 4)
    # is too small for many resources at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsv4"))


@kopf.on.cleanup()
async def stop_background(**_: Any) -> None:
    """Stop the ticker and pending refreshes."""
    for task in list(_background):
        task.cancel()


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def track(type: str, body: kopf.Body, namespace: str | None, name: str | None, **_: Any) -> None:
    """Remember the latest body of every resource (the ticker and the status refreshes read it)."""
    global _ticker_started
    if not _ticker_started:
        # Started from a resource handler, not at start-up: kopf's Event poster lives in this context.
        _ticker_started = True
        _spawn(_ticker())
    if namespace is None or name is None:
        return
    key = (namespace, name)
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        _resources.pop(key, None)
        _memos.pop(key, None)
    else:
        _resources[key] = dict(body)


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def reconcile_handler(body: kopf.Body, **kwargs: Any) -> None:
    """Apply the children of the spec and write the status."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    _reconciling.add(key)
    first = kwargs.get("reason") == kopf.Reason.CREATE
    try:
        reconcile.reconcile(kube(), body, default_image(), _poster(body), first=first)
    finally:
        _reconciling.discard(key)
    _memos.setdefault(key, {})["resynced"] = time.monotonic()


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, optional=True)
def deleted(name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Nothing to do: owner references let the garbage collector remove every child."""
    logger.info("DeepSeekV4Deployment %s/%s deleted; its children are garbage-collected", namespace, name)


def _owner_name(labels: kopf.Labels) -> str | None:
    return labels.get("app.kubernetes.io/instance")


# In-memory indices fed by the watches the operator holds anyway: an event-driven status refresh reads the resource,
# its workloads and its pods from them instead of four API calls (the timer's poll still reads the API server).
_CHILD = {"app.kubernetes.io/managed-by": MANAGER}
# Index values are slim references into the watch event's freshly decoded body (kopf never mutates it): a deep copy
# per event of every pod cost a tenth of the operator's CPU in a burst of 50 new resources.
_WORKLOAD_META = ("name", "namespace", "uid", "labels", "generation", "ownerReferences")
_POD_META = ("name", "namespace", "uid", "labels", "annotations", "deletionTimestamp", "ownerReferences")
_POD_STATUS = ("phase", "reason", "conditions", "containerStatuses", "initContainerStatuses", "podIP", "hostIP")


def _pick(obj: Mapping[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    obj = obj or {}
    return {k: obj[k] for k in keys if k in obj}


def _by_owner(namespace: str | None, labels: kopf.Labels, value: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    owner = _owner_name(labels)
    return {(namespace, owner): value} if owner and namespace else {}


def _workload(body: kopf.Body, kind: str) -> dict[str, Any]:
    spec = body.get("spec") or {}
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": _pick(body.get("metadata"), _WORKLOAD_META),
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": dict(body.get("status") or {}),
    }


@kopf.index("apps", "v1", "deployments", labels=_CHILD)
def deployments_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The operator's Deployments, by owner."""
    return _by_owner(namespace, labels, _workload(body, "Deployment"))


@kopf.index("apps", "v1", "statefulsets", labels=_CHILD)
def statefulsets_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The operator's StatefulSets, by owner."""
    return _by_owner(namespace, labels, _workload(body, "StatefulSet"))


@kopf.index("", "v1", "pods", labels=_CHILD)
def pods_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """The pods of the operator's workloads, by owner (what the status, group restarts and rank tables read)."""
    slim = {
        "metadata": _pick(body.get("metadata"), _POD_META),
        "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
        "status": _pick(body.get("status"), _POD_STATUS),
    }
    return _by_owner(namespace, labels, slim)


@kopf.on.event("apps", "v1", "deployments", labels=_CHILD)
@kopf.on.event("apps", "v1", "statefulsets", labels=_CHILD)
@kopf.on.event("", "v1", "pods", labels=_CHILD)
async def child_changed(labels: kopf.Labels, namespace: str | None, **kwargs: Any) -> None:
    """A pool or one of its pods changed: recompute the owner's status, once per burst of events.

    kopf passes the indices above by their names.
    """
    owner = _owner_name(labels)
    if not owner or not namespace:
        return
    key = (namespace, owner)
    if key in _refresh_pending:
        return
    _refresh_pending.add(key)
    indices = tuple(kwargs[n] for n in ("deployments_index", "statefulsets_index", "pods_index"))
    _spawn(_refresh_soon(key, indices))


async def _refresh_soon(key: Key, indices: tuple[kopf.Index[Any, Any], ...]) -> None:
    await asyncio.sleep(REFRESH_DELAY_S)
    while key in _reconciling:
        await asyncio.sleep(REFRESH_DELAY_S)
    # Cleared before the refresh: an event that arrives while it runs schedules the next one.
    _refresh_pending.discard(key)
    deployments, statefulsets, pods = indices
    # Read in the event loop's thread, which is the one that updates the indices.
    seen = reconcile.Seen(
        body=_resources.get(key),
        workloads=[*deployments.get(key, []), *statefulsets.get(key, [])],
        pods=list(pods.get(key, [])),
    )
    try:
        await asyncio.to_thread(reconcile.refresh_status, kube(), *key, _poster, seen)
    except Exception:  # a failed refresh is repaired by the next child event or the resync timer
        logging.getLogger(__name__).exception("status refresh of %s/%s failed", *key)


async def _ticker() -> None:
    """Every TICK_S, start the tick of each resource whose previous tick has finished."""
    while True:
        await asyncio.sleep(TICK_S)
        for key, body in list(_resources.items()):
            if key not in _ticking:
                _ticking.add(key)
                _spawn(_tick(key, body))


async def _tick(key: Key, body: dict[str, Any]) -> None:
    """Drift repair every RESYNC_S, a status poll every STATUS_POLL_S, the planner at its interval, the prefix-cache
    figures every prefix_status.POLL_S."""
    try:
        memo = _memos.setdefault(key, {})
        now = time.monotonic()
        last = memo.get("resynced")
        if last is None:
            # The create or resume handler reconciles it (kopf retries it if it failed): start the clock there.
            memo["resynced"] = memo["polled"] = now
        elif now - last >= RESYNC_S:
            memo["resynced"] = memo["polled"] = now
            await asyncio.to_thread(reconcile.reconcile, kube(), body, default_image(), _poster(body))
        elif now - memo.get("polled", now) >= STATUS_POLL_S:
            memo["polled"] = now
            await asyncio.to_thread(reconcile.refresh_status, kube(), *key, _poster)
        await autoscaler.maybe_plan(kube(), body, memo, _poster(body), log)
        await prefix_status.maybe_report(kube(), body, memo)
    except Exception:  # the next tick tries again
        log.exception("tick of %s/%s failed", *key)
    finally:
        _ticking.discard(key)
