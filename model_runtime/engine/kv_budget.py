"""How many blocks an engine's KV pool gets: a fixed count, or (the default) a fraction of the device memory that
is free once the weights are loaded, so a model that leaves more room serves more tokens.

On CUDA and Ascend the free memory is what the driver reports (`mem_get_info`); every rank of a group takes the
smallest count of the group, since all ranks hold the same blocks. A CPU has no device memory to size from: there
"auto" is `CPU_AUTO_BLOCKS`, the count every engine had before pools were sized (set `num_blocks` to choose).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.engine.kv_layout import bytes_per_token, sequence_constant_bytes

log = logging.getLogger("dsv4.model_runtime.engine")

CPU_AUTO_BLOCKS = 4096


class KVBudgetError(ValueError):
    """The memory left after loading cannot hold one block and the sequence slots; the message says how much."""


@dataclass(frozen=True)
class KVBudget:
    """The pool's size and what decided it."""

    num_blocks: int
    block_size: int
    block_bytes: int
    slot_bytes: int  # all slots together
    free_bytes: int | None  # device memory free after loading (None on CPU or for a fixed count)
    fraction: float | None

    @property
    def max_tokens(self) -> int:
        """Token positions the pool holds (all sequences together)."""
        return self.num_blocks * self.block_size

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.slot_bytes

    def describe(self) -> str:
        size = f"{self.num_blocks:,} blocks of {self.block_size} positions = {self.max_tokens:,} tokens"
        size += f" ({self.pool_bytes / 2**30:.2f} GiB with {self.slot_bytes / 2**20:.1f} MiB of sequence slots)"
        if self.free_bytes is None:
            return f"KV pool: {size}, a fixed count"
        assert self.fraction is not None
        return f"KV pool: {size}: {self.fraction:.0%} of the {self.free_bytes / 2**30:.2f} GiB free after loading"


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on `device` as its driver reports them; None for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "npu":
        return int(torch.npu.mem_get_info(device)[0])  # type: ignore[attr-defined]
    if device.type == "cpu":
        return None
    raise KVBudgetError(f"KV pool: cannot read the free memory of a {device.type} device; set num_blocks")


def kv_budget(
    cfg: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    low_precision: bool,
    mtp_layers: int,
    block_size: int,
    num_slots: int,
    num_blocks: int | None,
    fraction: float,
) -> KVBudget:
    """The pool of an engine: `num_blocks` when given, else `fraction` of the free device memory (the smallest
    over the ranks of an initialized process group)."""
    block_bytes = round(bytes_per_token(cfg, dtype, low_precision) * block_size)
    slot_bytes = num_slots * sequence_constant_bytes(cfg, dtype, mtp_layers)
    if num_blocks is not None:
        return KVBudget(num_blocks, block_size, block_bytes, slot_bytes, None, None)
    if not 0 < fraction <= 1:
        raise KVBudgetError(f"KV pool: kv_memory_fraction {fraction} must be in (0, 1]")
    free = free_device_memory(device)
    if free is None:
        return KVBudget(CPU_AUTO_BLOCKS, block_size, block_bytes, slot_bytes, None, None)
    budget = budget_from_free(free, fraction, block_size, block_bytes, slot_bytes)
    if dist.is_available() and dist.is_initialized():  # every rank holds the same blocks: the group's smallest
        t = torch.tensor([budget.num_blocks], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        budget = KVBudget(int(t.item()), block_size, block_bytes, slot_bytes, free, fraction)
    return budget


def budget_from_free(free: int, fraction: float, block_size: int, block_bytes: int, slot_bytes: int) -> KVBudget:
    """The pool that `fraction` of `free` bytes holds after the sequence slots; raises when not one block fits."""
    usable = int(free * fraction) - slot_bytes
    blocks = usable // block_bytes if block_bytes else 0
    if blocks < 1:
        raise KVBudgetError(
            f"KV pool: {fraction:.0%} of the {free / 2**30:.2f} GiB free after loading is "
            f"{free * fraction / 2**30:.2f} GiB; the sequence slots need {slot_bytes / 2**30:.2f} GiB and one "
            f"block {block_bytes / 2**20:.1f} MiB more: lower max_num_seqs, the context or use more devices"
        )
    return KVBudget(blocks, block_size, block_bytes, slot_bytes, free, fraction)
