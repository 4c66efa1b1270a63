"""The torch.distributed backend of a device, and the collective the sharded layers need."""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch.distributed backend per device type: gloo for CPU, NCCL for NVIDIA GPUs, HCCL for Ascend NPUs.
_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def backend_for(device: torch.device | str) -> str:
    """The torch.distributed backend for tensors on `device`."""
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        raise ValueError(f"no torch.distributed backend for device type {kind!r}")
    return _BACKENDS[kind]


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `t` over the ranks of `group` (None: the world) in place (fp32 for the reduction when t is lower
    precision) and return it."""
    if t.dtype in (torch.float32, torch.float64):
        dist.all_reduce(t, group=group)
        return t
    acc = t.float()
    dist.all_reduce(acc, group=group)
    return t.copy_(acc)
