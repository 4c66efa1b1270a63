"""Fabric wiring per accelerator: NCCL/HCCL env, RDMA devices with IPC_LOCK, /dev/shm sized from the layout and
charged to the memory request, the HwHiAiUser group, the Ascend rank-table file, bf16 on accelerators, and the
drain timeout that follows the grace period."""

from __future__ import annotations

from typing import Any

import pytest

from dsv4.operator import builders, pod_templates, profiles, rank_table, worker_model
from dsv4.operator.ownership import Owner
from dsv4.operator.quantity import QuantityError, from_bytes, to_bytes
from dsv4.protocol import contract, env

from .conftest import Admit

pytestmark = pytest.mark.unit

OWNER = Owner(name="demo", namespace="serving", uid="uid")
NVIDIA = {
    "model": {"variant": "flash", "source": {"hostPath": "/w"}},
    "accelerator": {
        "type": "nvidia",
        "devicesPerPod": 8,
        "fabric": {
            "socketInterface": "eth0",
            "ibHca": "mlx5_0,mlx5_1",
            "rdma": {"resourceName": "rdma/rdma_shared_device_a", "count": 2},
        },
    },
    "decode": {
        "parallelism": {"tensor": 8},
        "resources": {"requests": {"memory": "256Gi"}, "limits": {"memory": "300Gi"}},
    },
}
ASCEND = {
    "model": {"variant": "pro", "source": {"hostPath": "/w"}},
    "accelerator": {"type": "ascend", "product": "910C", "devicesPerPod": 16, "fabric": {"socketInterface": "enp"}},
}


def _pod(admit: Admit, raw: dict[str, Any], role: str = "decode") -> dict[str, Any]:
    kids = {(c["kind"], c["metadata"]["name"]): c for c in builders.children(OWNER, admit(raw), "img")}
    template: dict[str, Any] = kids[("Deployment", f"demo-{role}")]["spec"]["template"]
    return template


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_nvidia_fabric_env_rdma_and_ipc_lock(admit: Admit) -> None:
    pod = _pod(admit, NVIDIA)
    c = pod["spec"]["containers"][0]
    got = _env(pod)
    assert got["NCCL_SOCKET_IFNAME"] == "eth0" and got["GLOO_SOCKET_IFNAME"] == "eth0"
    assert got["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert c["resources"]["limits"]["rdma/rdma_shared_device_a"] == "2"
    assert c["resources"]["requests"]["rdma/rdma_shared_device_a"] == "2"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}


def test_no_rdma_no_extra_capability(admit: Admit) -> None:
    raw = {**NVIDIA, "accelerator": {"type": "nvidia", "devicesPerPod": 8}}
    pod = _pod(admit, raw)
    assert pod["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "NCCL_IB_HCA" not in _env(pod) and "NCCL_SOCKET_IFNAME" not in _env(pod)


def test_shm_follows_the_layout_and_is_counted_in_memory(admit: Admit) -> None:
    pod = _pod(admit, NVIDIA)
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm == {"medium": "Memory", "sizeLimit": "16Gi"}  # 8 ranks x 2 GiB
    res = pod["spec"]["containers"][0]["resources"]
    assert res["requests"]["memory"] == "272Gi" and res["limits"]["memory"] == "316Gi"
    # Without a memory request, the request is the shared memory itself; fewer devices, less shared memory.
    small = {**NVIDIA, "decode": {"parallelism": {"tensor": 2}}, "accelerator": {"type": "nvidia"}}
    res = _pod(admit, small)["spec"]["containers"][0]["resources"]
    assert res["requests"]["memory"] == "4Gi" and "memory" not in res["limits"]


def test_ascend_hccl_env_driver_group_and_rank_table_file(admit: Admit) -> None:
    pod = _pod(admit, ASCEND)
    got = _env(pod)
    assert got["HCCL_SOCKET_IFNAME"] == "enp" and got["HCCL_IF_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert got["HCCL_CONNECT_TIMEOUT"] == profiles.HCCL_CONNECT_TIMEOUT_S
    assert got[env.RANK_TABLE_FILE] == contract.RANK_TABLE_FILE
    assert pod["spec"]["securityContext"]["supplementalGroups"] == [profiles.HWHIAIUSER_GID]
    assert pod["metadata"]["annotations"][rank_table.TABLE_ANNOTATION] == rank_table.INITIALIZING
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "rank-table")
    [item] = volume["downwardAPI"]["items"]
    assert item["path"] == "hccl.json" and rank_table.TABLE_ANNOTATION in item["fieldRef"]["fieldPath"]
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[contract.RANK_TABLE_DIR]["readOnly"] is True
    other = {**ASCEND, "accelerator": {**ASCEND["accelerator"], "driverGroupId": 1201}}
    assert _pod(admit, other)["spec"]["securityContext"]["supplementalGroups"] == [1201]


@pytest.mark.parametrize(("raw", "dtype"), [(NVIDIA, "bfloat16"), (ASCEND, "bfloat16")], ids=["nvidia", "ascend"])
def test_accelerators_run_bf16(admit: Admit, raw: dict[str, Any], dtype: str) -> None:
    assert _env(_pod(admit, raw))[env.DTYPE] == dtype


def test_drain_timeout_follows_the_grace_period(admit: Admit) -> None:
    raw = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}, "decode": {"drainSeconds": 120}}
    pod = _pod(admit, raw)
    assert _env(pod)[env.DRAIN_TIMEOUT_S] == "120"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120 + pod_templates.EXIT_MARGIN_SECONDS
    default = _pod(admit, {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}, "prefill")
    drain = int(_env(default)[env.DRAIN_TIMEOUT_S])
    assert drain < default["spec"]["terminationGracePeriodSeconds"] == drain + pod_templates.EXIT_MARGIN_SECONDS


def test_gateway_sleeps_before_sigterm_within_its_grace(admit: Admit) -> None:
    pod = _pod(admit, {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}, "gateway")
    pre = pod["spec"]["containers"][0]["lifecycle"]["preStop"]
    assert pre == {"sleep": {"seconds": pod_templates.GATEWAY_PRESTOP_SECONDS}}
    assert pod["spec"]["terminationGracePeriodSeconds"] > pod_templates.GATEWAY_PRESTOP_SECONDS


def test_pods_carry_prometheus_scrape_annotations(admit: Admit) -> None:
    for role, port in (("gateway", contract.GATEWAY_PORT), ("decode", contract.WORKER_PORT)):
        annotations = _pod(admit, {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}, role)["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == contract.METRICS_PATH


def test_service_monitor_only_when_its_crd_exists(admit: Admit) -> None:
    spec = admit({"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}})
    assert not [c for c in builders.children(OWNER, spec, "img") if c["kind"] == "ServiceMonitor"]
    kids = builders.children(OWNER, spec, "img", builders.ClusterApis(service_monitor=True))
    [monitor] = [c for c in kids if c["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = {
        c["metadata"]["name"]
        for c in kids
        if c["kind"] == "Service" and selector.items() <= c["metadata"]["labels"].items()
    }
    assert scraped == {"demo-gateway", "demo-prefill", "demo-decode"}
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": contract.METRICS_PATH, "interval": "15s"}]


def test_local_cache_copies_weights_before_the_worker_starts(admit: Admit) -> None:
    raw = {**NVIDIA, "model": {**NVIDIA["model"], "localCache": {"hostPath": "/var/lib/dsv4"}}}
    pod = _pod(admit, raw)
    [init] = pod["spec"]["initContainers"]
    assert init["command"][:3] == ["python", "-m", "dsv4.operator.prewarm"]
    src, dst = init["command"][3:]
    assert src == contract.MODEL_DIR and dst.startswith(worker_model.MODEL_CACHE_DIR + "/flash-")
    assert _env(pod)[env.MODEL] == dst
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"]["hostPath"] == {"path": "/var/lib/dsv4", "type": "DirectoryOrCreate"}
    main_mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert main_mounts["model-cache"]["readOnly"] is True and "model" not in main_mounts
    # A different revision is a different cache folder; without hostPath the cache is an emptyDir at the root.
    other = {**raw, "model": {**raw["model"], "revision": "r2"}}
    assert _pod(admit, other)["spec"]["initContainers"][0]["command"][-1] != dst
    empty = {**NVIDIA, "model": {**NVIDIA["model"], "localCache": {"sizeLimit": "2Ti"}}}
    pod = _pod(admit, empty)
    assert {v["name"]: v for v in pod["spec"]["volumes"]}["model-cache"]["emptyDir"] == {"sizeLimit": "2Ti"}
    assert _env(pod)[env.MODEL] == worker_model.MODEL_CACHE_DIR


def test_quantities() -> None:
    assert to_bytes("16Gi") == 16 << 30 and to_bytes("1.5G") == 1_500_000_000 and to_bytes(1024) == 1024
    for bad in ("lots", "500m", "-1Gi"):
        with pytest.raises(QuantityError, match="not a memory quantity"):
            to_bytes(bad)
    assert from_bytes(272 << 30) == "272Gi" and from_bytes(1536 << 20) == "1536Mi" and from_bytes(1000) == "1000"
