"""The simulated node pools kwok runs in the test cluster: what an operator test may rely on.

Labels and taints follow what the vendors' device plugins and feature discovery put on real nodes
(NVIDIA GPU feature discovery / GPU operator, Huawei's Ascend device plugin), so manifests built for real
clusters schedule here unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kwok manages only nodes carrying this annotation; nodes without it are left alone.
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
POOL_LABEL = "dsv4.test/pool"

NVIDIA_GPU_RESOURCE = "nvidia.com/gpu"
ASCEND_NPU_RESOURCE = "huawei.com/Ascend910"
# The NVIDIA Network Operator's shared RDMA device (k8s-rdma-shared-dev-plugin's default name).
RDMA_RESOURCE = "rdma/rdma_shared_device_a"
# Volcano's label of an Atlas A3 node's super pod.
SUPERPOD_LABEL = "huawei.com/topotree.superpodid"


@dataclass(frozen=True)
class Taint:
    """A node taint; `toleration()` gives the matching pod toleration."""

    key: str
    value: str
    effect: str = "NoSchedule"

    def as_dict(self) -> dict[str, str]:
        """The taint as it appears in a Node's spec.taints."""
        return {"key": self.key, "value": self.value, "effect": self.effect}

    def toleration(self) -> dict[str, str]:
        """A pod toleration that tolerates exactly this taint."""
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class NodePool:
    """A set of identical kwok nodes named `<name>-0`, `<name>-1`, ..."""

    name: str
    size: int
    labels: dict[str, str]
    taints: tuple[Taint, ...]
    allocatable: dict[str, str]
    architecture: str = "amd64"
    accelerator_resource: str | None = None
    extra_annotations: dict[str, str] = field(default_factory=dict)
    node_labels: tuple[dict[str, str], ...] = ()  # extra labels of node i (e.g. its fabric domain), when set

    @property
    def node_names(self) -> tuple[str, ...]:
        """Names of this pool's nodes."""
        return tuple(f"{self.name}-{i}" for i in range(self.size))

    def tolerations(self) -> list[dict[str, str]]:
        """Tolerations a pod needs to run on this pool."""
        return [t.toleration() for t in self.taints]

    def node_manifest(self, index: int) -> dict[str, Any]:
        """The Node object for node `index` of the pool, with the status kwok keeps reporting."""
        name = self.node_names[index]
        labels = {
            **self.labels,
            **(self.node_labels[index] if self.node_labels else {}),
            POOL_LABEL: self.name,
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": self.architecture,
            "type": "kwok",
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {KWOK_ANNOTATION: "fake", **self.extra_annotations},
            },
            "spec": {"taints": [t.as_dict() for t in self.taints]},
            "status": {
                "allocatable": dict(self.allocatable),
                "capacity": dict(self.allocatable),
                "nodeInfo": {"architecture": self.architecture, "operatingSystem": "linux"},
            },
        }


_HOST = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}

NVIDIA_POOL = NodePool(
    name="gpu-h200",
    size=6,
    labels={
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-H200",
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": "143771",
        "nvidia.com/cuda.driver.major": "570",
        "node.kubernetes.io/instance-type": "gpu-8x-h200",
    },
    taints=(Taint(NVIDIA_GPU_RESOURCE, "present"),),
    allocatable={**_HOST, "cpu": "192", "memory": "2Ti", NVIDIA_GPU_RESOURCE: "8", RDMA_RESOURCE: "1k"},
    accelerator_resource=NVIDIA_GPU_RESOURCE,
)

ASCEND_POOL = NodePool(
    name="npu-910b",
    size=2,
    labels={
        "accelerator": "huawei-Ascend910",
        "accelerator-type": "module-910b-8",
        "node.kubernetes.io/npu.chip.name": "910B3",
        "node.kubernetes.io/instance-type": "npu-8x-910b",
    },
    taints=(Taint(ASCEND_NPU_RESOURCE, "present"),),
    allocatable={**_HOST, "cpu": "192", "memory": "1536Gi", ASCEND_NPU_RESOURCE: "8"},
    architecture="arm64",
    accelerator_resource=ASCEND_NPU_RESOURCE,
)

# Atlas A3 (910C) nodes: 16 NPU dies each, two super pods of four nodes. Four, so that a prefill and a decode
# group of two pods each always fit, whichever nodes their first pods land on: the scheduler places a group pod by
# pod (no gang scheduling here), and with three nodes a super pod could be left with one free node for a second pod.
ASCEND_A3_POOL = NodePool(
    name="npu-910c",
    size=8,
    labels={
        "accelerator": "huawei-Ascend910",
        "accelerator-type": "module-a3-16-super-pod",
        "node.kubernetes.io/instance-type": "npu-16x-910c",
    },
    taints=(Taint(ASCEND_NPU_RESOURCE, "present"),),
    allocatable={**_HOST, "cpu": "320", "memory": "1536Gi", ASCEND_NPU_RESOURCE: "16"},
    architecture="arm64",
    accelerator_resource=ASCEND_NPU_RESOURCE,
    node_labels=tuple({SUPERPOD_LABEL: str(i // 4)} for i in range(8)),
)

CPU_POOL = NodePool(
    name="cpu",
    size=2,
    labels={"node.kubernetes.io/instance-type": "cpu-64"},
    taints=(),
    allocatable=dict(_HOST),
)

NODE_POOLS: tuple[NodePool, ...] = (NVIDIA_POOL, ASCEND_POOL, ASCEND_A3_POOL, CPU_POOL)
