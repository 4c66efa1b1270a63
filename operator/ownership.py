"""Who the children of a DeepSeekV4Deployment belong to: their owner, names, labels and metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsv4.operator import api

APP_NAME = "dsv4"
MANAGER = "dsv4-operator"


@dataclass(frozen=True)
class Owner:
    """The DeepSeekV4Deployment the children belong to."""

    name: str
    namespace: str
    uid: str


def labels(owner: Owner, component: str) -> dict[str, str]:
    """Selector labels of one component; also what `kubectl get -l` users filter on."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": component,
    }


def all_labels(owner: Owner, component: str) -> dict[str, str]:
    """`labels` plus the ones that say who manages the object."""
    return {**labels(owner, component), "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "dsv4"}


def child_name(owner: Owner, component: str) -> str:
    """Name of the children of `component` (gateway, prefill, decode, redis, config)."""
    return f"{owner.name}-{component}"


def metadata(owner: Owner, component: str, name: str | None = None) -> dict[str, Any]:
    """The metadata of a child: name, namespace, labels and the controller owner reference."""
    return {
        "name": name or child_name(owner, component),
        "namespace": owner.namespace,
        "labels": all_labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
