"""kopf handlers: thin wiring of cluster events to `reconcile.py` and `autoscaler.py`.

- create / update / resume: reconcile (apply children, delete unwanted ones, write status, post Events);
- child Deployment / StatefulSet / pod changes: refresh the owner's status (Ready follows the pods), restart broken
  rank groups of the StatefulSet fallback and write the Ascend rank tables (`reconcile.tend_groups`);
- a timer: drift repair every RESYNC_S, and the planner when `spec.autoscaling.enabled`;
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

from dsv4.operator import api, autoscaler, reconcile
from dsv4.operator.builders import MANAGER
from dsv4.operator.kube import Kube
from dsv4.protocol import env

DEFAULT_IMAGE = "ghcr.io/dsv4/dsv4:0.1.0"
TICK_S = 5.0  # timer granularity; the planner runs every spec.autoscaling.intervalSeconds
RESYNC_S = 60.0  # repair drift (a child edited or deleted by hand) at least this often
# Watch events can lag far behind the API server's state when it is overloaded (seen in the test cluster, where
# the ReplicaSet controller missed pod updates for minutes); a cheap poll bounds how stale the status gets.
STATUS_POLL_S = 10.0
REFRESH_DELAY_S = 0.5  # child events arrive in bursts (a rollout sends dozens); one status refresh per burst

_refresh_pending: set[tuple[str, str]] = set()
_refresh_tasks: set[asyncio.Task[None]] = set()

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
    # The timer makes kopf hold a finalizer, so that it can stop the timer before the resource goes.
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's would repeat them
    settings.execution.max_workers = 16
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    settings.networking.request_timeout = 30
    # Status refreshes and the timer run blocking API calls through asyncio.to_thread; the default pool (cores + 4)
    # is too small for many resources at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsv4"))


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
def reconcile_handler(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Apply the children of the spec and write the status."""
    reconcile.reconcile(kube(), body, default_image(), _poster(body))
    memo["resynced"] = time.monotonic()


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, optional=True)
def deleted(name: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Nothing to do: owner references let the garbage collector remove every child."""
    logger.info("DeepSeekV4Deployment %s/%s deleted; its children are garbage-collected", namespace, name)


def _owner_name(labels: kopf.Labels) -> str | None:
    return labels.get("app.kubernetes.io/instance")


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGER})
@kopf.on.event("apps", "v1", "statefulsets", labels={"app.kubernetes.io/managed-by": MANAGER})
@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/managed-by": MANAGER})
async def child_changed(labels: kopf.Labels, namespace: str | None, type: str, **_: Any) -> None:
    """A pool or one of its pods changed: recompute the owner's status, once per burst of events."""
    owner = _owner_name(labels)
    if not owner or not namespace:
        return
    key = (namespace, owner)
    if key in _refresh_pending:
        return
    _refresh_pending.add(key)
    task = asyncio.get_running_loop().create_task(_refresh_soon(key))
    _refresh_tasks.add(task)
    task.add_done_callback(_refresh_tasks.discard)


async def _refresh_soon(key: tuple[str, str]) -> None:
    await asyncio.sleep(REFRESH_DELAY_S)
    # Cleared before the refresh: an event that arrives while it runs schedules the next one.
    _refresh_pending.discard(key)
    try:
        await asyncio.to_thread(reconcile.refresh_status, kube(), *key, _poster)
    except Exception:  # a failed refresh is repaired by the next child event or the resync timer
        logging.getLogger(__name__).exception("status refresh of %s/%s failed", *key)


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=TICK_S, initial_delay=TICK_S)
async def tick(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Drift repair every RESYNC_S, a status poll every STATUS_POLL_S, the planner at its interval."""
    now = time.monotonic()
    last = memo.get("resynced")
    if last is None or now - last >= RESYNC_S:
        memo["resynced"] = memo["polled"] = now
        await asyncio.to_thread(reconcile.reconcile, kube(), body, default_image(), _poster(body))
    elif now - memo.get("polled", now) >= STATUS_POLL_S:
        memo["polled"] = now
        meta = body["metadata"]
        await asyncio.to_thread(reconcile.refresh_status, kube(), meta["namespace"], meta["name"], _poster)
    await autoscaler.maybe_plan(kube(), body, memo, _poster(body), logger)
