"""The operator's few Kubernetes calls: server-side apply, listing and deleting children, status and spec patches.

Every call is retried on 409 Conflict, 429 and 5xx with a short backoff; what still fails is raised for kopf to
retry the handler later. No manifest logic here: that is in `builders.py`.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client import ApiClient, ApiException
from kubernetes.dynamic import DynamicClient

from dsv4.operator import api, rank_groups
from dsv4.operator.builders import SERVICE_MONITOR_API_VERSION, ClusterApis
from dsv4.operator.ownership import MANAGER

T = TypeVar("T")
_listers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsv4-list")

RETRYABLE = {409, 429, 500, 502, 503, 504}
ATTEMPTS = 5
BACKOFF_S = 0.2
# (connect, read) seconds: an overloaded API server must not stall a handler forever.
TIMEOUT = (5.0, 30.0)
POOL_SIZE = 32  # parallel applies, status refreshes and the planner share one client

# Kinds the operator creates, as (apiVersion, kind); listing them by label finds every child, including orphans.
WORKLOAD_KINDS = (("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"))
CHILD_KINDS = (("v1", "ConfigMap"), ("v1", "Service"), *WORKLOAD_KINDS, ("policy/v1", "PodDisruptionBudget"))
# Kinds of optional APIs: used only while the cluster serves them (`Kube.cluster_apis`).
LWS_KIND = (rank_groups.LWS_API_VERSION, rank_groups.LWS_KIND)
SERVICE_MONITOR_KIND = (SERVICE_MONITOR_API_VERSION, "ServiceMonitor")
# Installing or removing an optional API (LWS, the Prometheus Operator) is noticed within this many seconds.
APIS_TTL_S = 30.0


def retrying(call: Callable[[], T], attempts: int = ATTEMPTS, retry_conflicts: bool = True) -> T:
    """`call()`, retried on conflicts, throttling, server errors and timeouts with exponential backoff.

    `retry_conflicts=False` for calls with a precondition, whose 409 is an answer, not contention.
    """
    for attempt in range(attempts):
        try:
            return call()
        except ApiException as err:
            retryable = err.status in RETRYABLE and (retry_conflicts or err.status != 409)
            if not retryable or attempt == attempts - 1:
                raise
        except urllib3.exceptions.HTTPError:
            if attempt == attempts - 1:
                raise
        time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


@contextmanager
def not_found_as_none() -> Iterator[None]:
    """Swallow 404 (the object is already gone, or not there yet)."""
    try:
        yield
    except ApiException as err:
        if err.status != 404:
            raise


@contextmanager
def _gone_or_replaced() -> Iterator[None]:
    """Swallow 404 and the refusals of a uid precondition (409, or 422 for a patch that would change the uid)."""
    try:
        yield
    except ApiException as err:
        if err.status not in (404, 409, 422):
            raise


@dataclass
class Kube:
    """A thin client over one API server."""

    dynamic: DynamicClient
    core: kubernetes.client.CoreV1Api
    custom: kubernetes.client.CustomObjectsApi
    # Resolved once: the dynamic client's lazy discovery is not safe to run from several threads at once.
    resources: dict[tuple[str, str], Any] = field(default_factory=dict)
    _apis: tuple[float, ClusterApis] | None = None
    _discovery_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls) -> Kube:
        """From the pod's service account in a cluster, else from KUBECONFIG / ~/.kube/config."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        config = kubernetes.client.Configuration.get_default_copy()
        config.connection_pool_maxsize = POOL_SIZE
        client = ApiClient(config)
        # The discovery cache is per process: the default file is shared by every client on the machine and a
        # concurrent writer leaves it half-written.
        cache = os.path.join(tempfile.gettempdir(), f"dsv4-operator-discovery-{os.getpid()}.json")
        dynamic = DynamicClient(client, cache_file=cache)
        kinds = (*CHILD_KINDS, ("v1", "Pod"))
        resources = {k: dynamic.resources.get(api_version=k[0], kind=k[1]) for k in kinds}
        return cls(dynamic, kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client), resources)

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        found = self.resources.get(key)
        if found is None:
            with self._discovery_lock:
                # An optional API installed after start-up: the discovery cache predates it.
                self.dynamic.resources.invalidate_cache()
                found = self.resources[key] = self.dynamic.resources.get(api_version=api_version, kind=kind)
        return found

    def _serves(self, group_version: str, plural: str) -> bool:
        group, version = group_version.split("/")

        def get() -> Any:
            return self.custom.get_api_resources(group, version, _request_timeout=TIMEOUT)

        try:
            found = retrying(get)
        except ApiException as err:
            if err.status in (403, 404):
                return False
            raise
        return any(r.name == plural for r in (found.resources or []))

    def cluster_apis(self) -> ClusterApis:
        """The optional APIs this cluster serves (LeaderWorkerSet, ServiceMonitor), re-read every APIS_TTL_S."""
        now = time.monotonic()
        cached = self._apis
        if cached is not None and now - cached[0] < APIS_TTL_S:
            return cached[1]
        apis = ClusterApis(
            leader_worker_set=self._serves(LWS_KIND[0], "leaderworkersets"),
            service_monitor=self._serves(SERVICE_MONITOR_KIND[0], "servicemonitors"),
        )
        self._apis = (now, apis)
        return apis

    def child_kinds(self, workloads_only: bool = False) -> tuple[tuple[str, str], ...]:
        """The kinds of children to list: the built-in ones and those of the optional APIs the cluster serves."""
        apis = self.cluster_apis()
        kinds = WORKLOAD_KINDS if workloads_only else CHILD_KINDS
        if apis.leader_worker_set:
            kinds = (*kinds, LWS_KIND)
        if apis.service_monitor and not workloads_only:
            kinds = (*kinds, SERVICE_MONITOR_KIND)
        return kinds

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` as the operator's field manager; returns the object as stored."""
        res = self._resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        result = retrying(
            lambda: self.dynamic.server_side_apply(
                res,
                body=obj,
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=MANAGER,
                force_conflicts=True,
                _request_timeout=TIMEOUT,
            )
        )
        out: dict[str, Any] = result.to_dict()
        return out

    def list_children(
        self, namespace: str, instance: str, kinds: tuple[tuple[str, str], ...] | None = None
    ) -> list[dict[str, Any]]:
        """Every object of `kinds` (default: every child kind) labelled as belonging to `instance`."""
        selector = f"app.kubernetes.io/instance={instance},app.kubernetes.io/managed-by={MANAGER}"

        def list_kind(kind: tuple[str, str]) -> list[dict[str, Any]]:
            res = self._resource(*kind)
            found = retrying(
                lambda: self.dynamic.get(res, namespace=namespace, label_selector=selector, _request_timeout=TIMEOUT)
            )
            items: list[dict[str, Any]] = found.to_dict()["items"]
            for item in items:
                item.setdefault("apiVersion", kind[0])
                item.setdefault("kind", kind[1])
            return items

        wanted = kinds if kinds is not None else self.child_kinds()
        for kind in wanted:
            self._resource(*kind)  # resolve in this thread: discovery is not thread-safe
        # One round trip for all kinds, not one per kind.
        return [item for items in _listers.map(list_kind, wanted) for item in items]

    def list_pods(self, namespace: str, instance: str) -> list[dict[str, Any]]:
        """The pods of every pool of `instance`, as dicts."""
        pods = self.list_children(namespace, instance, (("v1", "Pod"),))
        return pods

    def delete(self, obj: dict[str, Any]) -> None:
        """Delete a child (already gone is fine)."""
        res = self._resource(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        with not_found_as_none():
            retrying(
                lambda: self.dynamic.delete(
                    res, name=meta["name"], namespace=meta["namespace"], _request_timeout=TIMEOUT
                )
            )

    def secret_has_key(self, namespace: str, name: str, key: str) -> bool | None:
        """Whether Secret `name` has `key`; None when the Secret does not exist."""
        try:
            secret = retrying(lambda: self.core.read_namespaced_secret(name, namespace, _request_timeout=TIMEOUT))
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return key in (secret.data or {}) or key in (secret.string_data or {})

    def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The DeepSeekV4Deployment `name`, or None when it is gone."""

        def get() -> dict[str, Any]:
            obj: Any = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=TIMEOUT
            )
            return dict(obj)

        with not_found_as_none():
            return retrying(get)
        return None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge `status` into the resource's status subresource."""
        with not_found_as_none():
            retrying(
                lambda: self.custom.patch_namespaced_custom_object_status(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _request_timeout=TIMEOUT
                )
            )

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """Merge `spec` into the resource's spec (the planner's replica changes)."""
        retrying(
            lambda: self.custom.patch_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": spec}, _request_timeout=TIMEOUT
            )
        )

    def pods(self, namespace: str, instance: str, component: str) -> list[Any]:
        """The pods of one pool."""
        selector = f"app.kubernetes.io/instance={instance},app.kubernetes.io/component={component}"
        return list(
            retrying(
                lambda: self.core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=TIMEOUT)
            ).items
        )

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """Delete pod `name` if it is still the one with `uid`, with its grace period (gone or replaced is fine)."""
        body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid))
        with _gone_or_replaced():
            retrying(
                lambda: self.core.delete_namespaced_pod(name, namespace, body=body, _request_timeout=TIMEOUT),
                retry_conflicts=False,
            )

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str], uid: str | None = None) -> None:
        """Merge `annotations` into a pod's metadata; with `uid`, only if it is still that pod."""
        meta: dict[str, Any] = {"annotations": annotations}
        if uid is not None:
            meta["uid"] = uid  # a precondition: the API server refuses the patch for another pod of that name
        with _gone_or_replaced():
            retrying(
                lambda: self.core.patch_namespaced_pod(name, namespace, {"metadata": meta}, _request_timeout=TIMEOUT),
                retry_conflicts=uid is None,
            )
