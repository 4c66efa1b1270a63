"""The HCCL rank table (`hccl.json`) of an Ascend rank group, built from its pods (pure functions).

The format is the one Huawei's Ascend operator writes for Volcano jobs: `server_list` (one server per pod, its
devices with their NIC IPs and global rank ids), `server_count`, `status`, `version`; for Atlas A3 super pods (910C)
version 1.2 with each device's `super_device_id` and a `super_pod_list`. The device ids and NIC IPs come from the
annotation the Ascend device plugin writes on every pod it gives NPUs to (`DEVICE_ANNOTATION`). Ranks are numbered
by node rank (the pod's index in its group), then by device id, so a group's leader holds ranks 0..n-1.

The table reaches the pod as a downward-API file (contract.RANK_TABLE_FILE) fed from the pod annotation
`TABLE_ANNOTATION`, which the operator rewrites on every pod of the group once the table is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsv4.protocol import contract

DEVICE_ANNOTATION = "ascend.kubectl.kubernetes.io/ascend-910-configuration"
TABLE_ANNOTATION = "dsv4.io/hccl-rank-table"


class RankTableError(ValueError):
    """A device-plugin annotation the operator cannot read."""


@dataclass(frozen=True)
class Member:
    """One pod of the group as the rank table sees it."""

    pod: str
    node_rank: int
    pod_ip: str | None
    host_ip: str | None
    devices: dict[str, Any] | None  # the device plugin's annotation, parsed; None until the plugin wrote it


def member(pod: Mapping[str, Any], node_rank: int) -> Member:
    """The rank-table view of a pod dict as the API server returns it."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    raw = (meta.get("annotations") or {}).get(DEVICE_ANNOTATION)
    devices = None
    if raw:
        try:
            devices = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RankTableError(f"pod {meta.get('name')}: {DEVICE_ANNOTATION} is not JSON: {err}") from err
        if not isinstance(devices, dict) or not isinstance(devices.get("devices"), list):
            raise RankTableError(f"pod {meta.get('name')}: {DEVICE_ANNOTATION} has no 'devices' list")
    return Member(meta.get("name", ""), node_rank, status.get("podIP"), status.get("hostIP"), devices)


def table(members: Sequence[Member], size: int) -> dict[str, Any]:
    """The group's rank table: `initializing` until all `size` pods have an IP and their devices, then complete."""
    ranked = sorted(members, key=lambda m: m.node_rank)
    if len(ranked) != size or any(m.devices is None or not m.pod_ip for m in ranked):
        return {"status": contract.RANK_TABLE_INITIALIZING}
    if [m.node_rank for m in ranked] != list(range(size)):
        return {"status": contract.RANK_TABLE_INITIALIZING}
    super_pod = all(
        m.devices is not None
        and "super_pod_id" in m.devices
        and all("super_device_id" in d for d in m.devices["devices"])
        for m in ranked
    )
    servers: list[dict[str, Any]] = []
    rank = 0
    for m in ranked:
        assert m.devices is not None  # checked above
        server_id = str(m.devices.get("server_id") or m.host_ip or m.pod_ip)
        devices = []
        for d in sorted(m.devices["devices"], key=lambda d: int(d["device_id"])):
            entry = {"device_id": str(d["device_id"]), "device_ip": str(d.get("device_ip", "")), "rank_id": str(rank)}
            if super_pod:
                entry["super_device_id"] = str(d["super_device_id"])
            devices.append(entry)
            rank += 1
        server: dict[str, Any] = {"server_id": server_id, "container_ip": m.pod_ip, "device": devices}
        if m.host_ip:
            server["host_ip"] = m.host_ip
        servers.append(server)
    out: dict[str, Any] = {
        "status": contract.RANK_TABLE_COMPLETED,
        "version": "1.2" if super_pod else "1.0",
        "server_count": str(len(servers)),
        "server_list": servers,
    }
    if super_pod:
        pods: dict[str, list[dict[str, str]]] = {}
        for m, server in zip(ranked, servers, strict=True):
            assert m.devices is not None
            pods.setdefault(str(m.devices["super_pod_id"]), []).append({"server_id": server["server_id"]})
        out["super_pod_list"] = [{"super_pod_id": k, "server_list": v} for k, v in sorted(pods.items())]
    return out


def render(t: Mapping[str, Any]) -> str:
    """The annotation value (and file content) of a table: compact, stable JSON."""
    return json.dumps(t, sort_keys=True, separators=(",", ":"))


INITIALIZING = render({"status": contract.RANK_TABLE_INITIALIZING})
