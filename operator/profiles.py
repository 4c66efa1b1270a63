"""Accelerator profiles: what a worker pod needs to run on an NVIDIA, Ascend or plain CPU node pool.

A profile is data (resources, placement, env, volumes); `builders.py` merges it into the pod template, and the pool's
`scheduling` overrides are merged over the profile's placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4.operator.spec import AcceleratorSpec
from dsv4.protocol.config import ParallelismConfig

NVIDIA_GPU = "nvidia.com/gpu"
ASCEND_910 = "huawei.com/Ascend910"
ASCEND_310P = "huawei.com/Ascend310P"

# Labels set by NVIDIA GPU feature discovery and by Huawei's Ascend device plugin / node labeller.
NVIDIA_PRESENT_LABEL = "nvidia.com/gpu.present"
NVIDIA_PRODUCT_LABEL = "nvidia.com/gpu.product"
ASCEND_ACCELERATOR_LABEL = "accelerator"

# Host files the Ascend runtime needs inside the container (driver, DCMI, npu-smi, version info, HCCN NIC config).
ASCEND_HOST_MOUNTS = (
    ("ascend-driver", "/usr/local/Ascend/driver", "Directory"),
    ("ascend-dcmi", "/usr/local/dcmi", "Directory"),
    ("ascend-npu-smi", "/usr/local/bin/npu-smi", "File"),
    ("ascend-install-info", "/etc/ascend_install.info", "File"),
    ("ascend-hccn-conf", "/etc/hccn.conf", "File"),
)
HCCL_CONNECT_TIMEOUT_S = "1200"  # first HCCL rendezvous on a large EP group is slow; the default 120 s is not enough


@dataclass(frozen=True)
class Profile:
    """Everything an accelerator adds to a worker pod."""

    device: str  # value of DSV4_DEVICE
    resources: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    shm_size: str | None = None  # /dev/shm as a memory-backed emptyDir (NCCL/HCCL and torch workers use it)


def devices_per_pod(acc: AcceleratorSpec, parallelism: ParallelismConfig) -> int:
    """Devices one worker pod asks for: the explicit count, else tensor x data parallelism."""
    if acc.type == "cpu":
        return 0
    return acc.devices_per_pod or parallelism.tensor * parallelism.data


def resource_name(acc: AcceleratorSpec) -> str | None:
    """The extended resource of the accelerator (None on CPU)."""
    if acc.resource_name:
        return acc.resource_name
    if acc.type == "nvidia":
        return NVIDIA_GPU
    if acc.type == "ascend":
        return ASCEND_310P if acc.product == "310P" else ASCEND_910
    return None


def profile(acc: AcceleratorSpec, parallelism: ParallelismConfig) -> Profile:
    """The profile of one worker pool on `acc`."""
    n = devices_per_pod(acc, parallelism)
    name = resource_name(acc)
    if acc.type == "nvidia" and name:
        selector = {NVIDIA_PRESENT_LABEL: "true"}
        if acc.product:
            selector[NVIDIA_PRODUCT_LABEL] = f"NVIDIA-{acc.product}"
        return Profile(
            device="cuda",
            resources={name: str(n)},
            node_selector=selector,
            tolerations=[{"key": NVIDIA_GPU, "operator": "Exists", "effect": "NoSchedule"}],
            env=[{"name": "NCCL_DEBUG", "value": "WARN"}],
            shm_size="16Gi",
        )
    if acc.type == "ascend" and name:
        return Profile(
            device="npu",
            resources={name: str(n)},
            node_selector={
                ASCEND_ACCELERATOR_LABEL: "huawei-" + ("Ascend310P" if acc.product == "310P" else "Ascend910")
            },
            tolerations=[{"key": name, "operator": "Exists", "effect": "NoSchedule"}],
            env=[
                # The device plugin hands the container n devices, renumbered from 0 by the Ascend runtime.
                {"name": "ASCEND_RT_VISIBLE_DEVICES", "value": ",".join(str(i) for i in range(n))},
                {"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HCCL_CONNECT_TIMEOUT", "value": HCCL_CONNECT_TIMEOUT_S},
                {"name": "HCCL_EXEC_TIMEOUT", "value": HCCL_CONNECT_TIMEOUT_S},
            ],
            volumes=[{"name": v, "hostPath": {"path": p, "type": t}} for v, p, t in ASCEND_HOST_MOUNTS],
            mounts=[{"name": v, "mountPath": p, "readOnly": True} for v, p, _ in ASCEND_HOST_MOUNTS],
            shm_size="16Gi",
        )
    return Profile(device="cpu")
