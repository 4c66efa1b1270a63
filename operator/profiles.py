"""Accelerator profiles: what a worker pod needs to run on an NVIDIA, Ascend or plain CPU node pool.

A profile is data (resources, placement, env, volumes, capabilities, the fabric domain); `builders.py` merges it
into the pod template, and the pool's `scheduling` overrides are merged over the profile's placement. The device
resource names are the ones the vendors' device plugins advertise (docs/operator.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsv4.operator.quantity import from_bytes
from dsv4.operator.spec import AcceleratorSpec, PoolSpec
from dsv4.protocol import contract, env

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
# The Ascend driver's device nodes and files belong to HwHiAiUser; its conventional gid, unless the spec says otherwise.
HWHIAIUSER_GID = 1000
# Atlas A3 (910C) super pods: Volcano's node label naming the super pod; HCCS links never leave one.
ASCEND_SUPERPOD_LABEL = "huawei.com/topotree.superpodid"
# /dev/shm per rank: NCCL/HCCL proxy buffers and torch's shared-memory tensors between the rank processes.
SHM_BYTES_PER_RANK = 2 << 30


@dataclass(frozen=True)
class Profile:
    """Everything an accelerator adds to a worker pod."""

    device: str  # value of DSV4_DEVICE
    ranks_per_pod: int = 1  # rank processes one pod starts (env.NPROC_PER_NODE)
    resources: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    shm_bytes: int = 0  # /dev/shm as a memory-backed emptyDir; counted in the container's memory request
    add_capabilities: tuple[str, ...] = ()  # added to the otherwise all-dropped capabilities
    supplemental_groups: tuple[int, ...] = ()
    topology_key: str | None = None  # node label every pod of a group shares
    rank_table: bool = False  # Ascend: the pod reads its group's HCCL rank table (contract.RANK_TABLE_FILE)

    @property
    def shm_size(self) -> str | None:
        """`sizeLimit` of the /dev/shm emptyDir, or None when the pod gets none."""
        return from_bytes(self.shm_bytes) if self.shm_bytes else None


def devices_per_pod(acc: AcceleratorSpec, pool: PoolSpec) -> int:
    """Devices one worker pod asks for: the explicit count, else the pool's tensor x data ranks over its pods."""
    if acc.type == "cpu":
        return 0
    ranks = pool.parallelism.tensor * pool.parallelism.data
    return acc.devices_per_pod or max(ranks // pool.pods_per_replica, 1)


def ranks_per_pod(acc: AcceleratorSpec, pool: PoolSpec) -> int:
    """Rank processes one worker pod starts: one per device, and one on a CPU pod."""
    return max(devices_per_pod(acc, pool), 1)


def resource_name(acc: AcceleratorSpec) -> str | None:
    """The extended resource of the accelerator (None on CPU)."""
    if acc.resource_name:
        return acc.resource_name
    if acc.type == "nvidia":
        return NVIDIA_GPU
    if acc.type == "ascend":
        return ASCEND_310P if acc.product == "310P" else ASCEND_910
    return None


def _socket_env(acc: AcceleratorSpec, names: tuple[str, ...]) -> list[dict[str, Any]]:
    iface = acc.fabric.socket_interface
    return [{"name": n, "value": iface} for n in names] if iface else []


def profile(acc: AcceleratorSpec, pool: PoolSpec) -> Profile:
    """The profile of one worker pool on `acc`."""
    n = devices_per_pod(acc, pool)
    name = resource_name(acc)
    fabric = acc.fabric
    if acc.type == "nvidia" and name:
        selector = {NVIDIA_PRESENT_LABEL: "true"}
        if acc.product:
            selector[NVIDIA_PRODUCT_LABEL] = f"NVIDIA-{acc.product}"
        resources = {name: str(n)}
        nccl = [{"name": "NCCL_DEBUG", "value": "WARN"}]
        nccl += _socket_env(acc, ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"))
        if fabric.ib_hca:
            nccl.append({"name": "NCCL_IB_HCA", "value": fabric.ib_hca})
        caps: tuple[str, ...] = ()
        if fabric.rdma is not None:
            resources[fabric.rdma.resource_name] = str(fabric.rdma.count)
            caps = ("IPC_LOCK",)  # RDMA pins (locks) its registered memory
        return Profile(
            device="cuda",
            ranks_per_pod=n,
            resources=resources,
            node_selector=selector,
            tolerations=[{"key": NVIDIA_GPU, "operator": "Exists", "effect": "NoSchedule"}],
            env=[*nccl, {"name": env.DTYPE, "value": "bfloat16"}],
            shm_bytes=SHM_BYTES_PER_RANK * n,
            add_capabilities=caps,
            topology_key=fabric.topology_key,
        )
    if acc.type == "ascend" and name:
        default_key = ASCEND_SUPERPOD_LABEL if acc.product == "910C" else None
        return Profile(
            device="npu",
            ranks_per_pod=n,
            resources={name: str(n)},
            node_selector={
                ASCEND_ACCELERATOR_LABEL: "huawei-" + ("Ascend310P" if acc.product == "310P" else "Ascend910")
            },
            tolerations=[{"key": name, "operator": "Exists", "effect": "NoSchedule"}],
            env=[
                # The device plugin hands the container n devices, renumbered from 0 by the Ascend runtime.
                {"name": "ASCEND_RT_VISIBLE_DEVICES", "value": ",".join(str(i) for i in range(n))},
                {"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                *_socket_env(acc, ("HCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")),
                {"name": "HCCL_CONNECT_TIMEOUT", "value": HCCL_CONNECT_TIMEOUT_S},
                {"name": "HCCL_EXEC_TIMEOUT", "value": HCCL_CONNECT_TIMEOUT_S},
                {"name": env.RANK_TABLE_FILE, "value": contract.RANK_TABLE_FILE},
                {"name": env.DTYPE, "value": "bfloat16"},
            ],
            volumes=[{"name": v, "hostPath": {"path": p, "type": t}} for v, p, t in ASCEND_HOST_MOUNTS],
            mounts=[{"name": v, "mountPath": p, "readOnly": True} for v, p, _ in ASCEND_HOST_MOUNTS],
            shm_bytes=SHM_BYTES_PER_RANK * n,
            supplemental_groups=(HWHIAIUSER_GID if acc.driver_group_id is None else acc.driver_group_id,),
            topology_key=fabric.topology_key or default_key,
            rank_table=True,
        )
    return Profile(device="cpu", topology_key=fabric.topology_key)
