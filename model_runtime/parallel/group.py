"""Who this rank is in the parallel layout, and the collective the sharded layers need."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ParallelConfig:
    """rank / world of the default process group; tp and ep are 1 (off) or the world size (on, same ranks)."""

    rank: int
    world: int
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name, size in (("tp", self.tp), ("ep", self.ep)):
            if size not in (1, self.world):
                raise ValueError(f"{name}={size}: must be 1 or the world size {self.world}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world {self.world}")

    @classmethod
    def from_process_group(cls, tp: bool, ep: bool) -> ParallelConfig:
        world = dist.get_world_size()
        return cls(dist.get_rank(), world, world if tp else 1, world if ep else 1)

    def span(self, total: int, parts: int, what: str) -> tuple[int, int]:
        """[start, stop) of this rank's equal share of `total` items split `parts` ways."""
        if total % parts:
            raise ValueError(f"{what}: {total} does not split evenly over {parts} ranks")
        share = total // parts
        index = self.rank if parts > 1 else 0
        return index * share, (index + 1) * share


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place (fp32 for the reduction when t is lower precision) and return it."""
    if t.dtype in (torch.float32, torch.float64):
        dist.all_reduce(t)
        return t
    acc = t.float()
    dist.all_reduce(acc)
    return t.copy_(acc)
