"""The HCCL rank table of an Ascend group, from its pods' device-plugin annotations: initializing until every pod
has its devices and IP; then one server per pod in node-rank order, global rank ids, and for 910C super pods the
1.2 format with super_device_id and super_pod_list."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dsv4.operator import rank_table
from dsv4.protocol import contract

pytestmark = pytest.mark.unit


def device_annotation(node: int, n: int, super_pod: int | None = None) -> str:
    """What the Ascend device plugin writes on a pod it gives `n` NPUs to."""
    devices: list[dict[str, Any]] = []
    for i in range(n):
        d: dict[str, Any] = {"device_id": str(i), "device_ip": f"192.168.{node}.{i}"}
        if super_pod is not None:
            d["super_device_id"] = str(node * n + i)
        devices.append(d)
    out: dict[str, Any] = {"pod_name": f"p{node}", "server_id": f"10.0.0.{node}", "devices": devices}
    if super_pod is not None:
        out["super_pod_id"] = super_pod
    return json.dumps(out)


def pod(name: str, node: int, devices: str | None, ip: str | None = "10.64.0.1") -> dict[str, Any]:
    annotations = {} if devices is None else {rank_table.DEVICE_ANNOTATION: devices}
    return {"metadata": {"name": name, "annotations": annotations}, "status": {"podIP": ip, "hostIP": f"10.0.0.{node}"}}


def test_initializing_until_every_pod_has_devices_and_an_ip() -> None:
    waiting = [
        [rank_table.member(pod("a", 0, device_annotation(0, 8)), 0)],  # one of two pods
        [
            rank_table.member(pod("a", 0, device_annotation(0, 8)), 0),
            rank_table.member(pod("b", 1, None), 1),  # plugin has not allocated yet
        ],
        [
            rank_table.member(pod("a", 0, device_annotation(0, 8)), 0),
            rank_table.member(pod("b", 1, device_annotation(1, 8), ip=None), 1),  # no IP yet
        ],
    ]
    for members in waiting:
        assert rank_table.table(members, 2) == {"status": contract.RANK_TABLE_INITIALIZING}
    assert json.loads(rank_table.INITIALIZING) == {"status": contract.RANK_TABLE_INITIALIZING}


def test_910b_group_table() -> None:
    members = [
        rank_table.member(pod("leader", 0, device_annotation(0, 8), "10.64.0.5"), 0),
        rank_table.member(pod("worker", 1, device_annotation(1, 8), "10.64.0.9"), 1),
    ]
    t = rank_table.table(list(reversed(members)), 2)  # order of the pods list does not matter
    assert t["status"] == contract.RANK_TABLE_COMPLETED and t["version"] == "1.0" and t["server_count"] == "2"
    leader, worker = t["server_list"]
    assert leader["container_ip"] == "10.64.0.5" and worker["container_ip"] == "10.64.0.9"
    assert leader["server_id"] == "10.0.0.0" and worker["host_ip"] == "10.0.0.1"
    assert [d["rank_id"] for d in leader["device"] + worker["device"]] == [str(r) for r in range(16)]
    assert worker["device"][3] == {"device_id": "3", "device_ip": "192.168.1.3", "rank_id": "11"}
    assert "super_pod_list" not in t


def test_910c_super_pod_table() -> None:
    members = [rank_table.member(pod(f"p{i}", i, device_annotation(i, 16, super_pod=7)), i) for i in range(2)]
    t = rank_table.table(members, 2)
    assert t["version"] == "1.2"
    assert t["server_list"][1]["device"][0] == {
        "device_id": "0",
        "device_ip": "192.168.1.0",
        "rank_id": "16",
        "super_device_id": "16",
    }
    assert t["super_pod_list"] == [
        {"super_pod_id": "7", "server_list": [{"server_id": "10.0.0.0"}, {"server_id": "10.0.0.1"}]}
    ]
    assert json.loads(rank_table.render(t)) == t


def test_devices_are_ranked_by_device_id() -> None:
    shuffled = json.loads(device_annotation(0, 4))
    shuffled["devices"].reverse()
    t = rank_table.table([rank_table.member(pod("a", 0, json.dumps(shuffled)), 0)], 1)
    assert [(d["device_id"], d["rank_id"]) for d in t["server_list"][0]["device"]] == [
        ("0", "0"),
        ("1", "1"),
        ("2", "2"),
        ("3", "3"),
    ]


def test_a_broken_annotation_is_a_clear_error() -> None:
    with pytest.raises(rank_table.RankTableError, match=r"pod a: .* is not JSON"):
        rank_table.member(pod("a", 0, "{oops"), 0)
    with pytest.raises(rank_table.RankTableError, match="no 'devices' list"):
        rank_table.member(pod("a", 0, json.dumps({"server_id": "x"})), 0)
