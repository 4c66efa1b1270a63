"""What every Triton wrapper of the `cuda` backend shares: device checks, block sizes, dtype flags.

Kernels are compiled for an NVIDIA GPU, or run by Triton's interpreter on CPU tensors when the process imported
this package with `TRITON_INTERPRET=1` (Triton decides at decoration time). A CPU tensor without the interpreter,
or a CUDA tensor under it, is a `KernelBackendError`: the backend never silently runs somewhere else.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dsv4.kernels.registry import KernelBackendError

# Fixed when this package is imported, like the @triton.jit decorations below it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# tl.dot needs every tile dimension >= 16.
MIN_DOT = 16


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless every tensor lives where this process runs Triton (GPU, or CPU under the interpreter)."""
    want = "cpu" if INTERPRETED else "cuda"
    for t in tensors:
        if t is not None and t.device.type != want:
            mode = "under TRITON_INTERPRET=1" if INTERPRETED else "compiled for the GPU"
            raise KernelBackendError(
                f"cuda backend op {op!r}: Triton runs {mode} in this process and needs {want} tensors, "
                f"got a {t.device.type} tensor"
            )


def block(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The power-of-two tile size covering n (at least `minimum`, at most `maximum`)."""
    b = max(minimum, triton.next_power_of_2(max(n, 1)))
    return min(b, maximum) if maximum is not None else b


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact fp32 for fp32 tensors (the reference's numerics), native otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tile_schedule(group_ends: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The row tiles of a grouped matmul, computed on the device without a host sync: (expert of each tile, first
    row of each tile, number of tiles launched). Tile t belongs to the expert whose cumulative tile count first
    exceeds t; spare tiles get expert E. Launched: ceil(rows / block_m) + min(E, rows), an upper bound (each
    non-empty expert wastes less than one tile, and at most min(E, rows) experts are non-empty), so a decode batch
    of a few rows launches a few tiles, not one per expert.

    The spare tiles, in order, start at the rows past the last end (rows of no expert), block_m apart, so a
    kernel writes those rows' zeros from them instead of zeroing its output first. There are always enough: with
    k >= 1 non-empty experts of n_e rows (k <= min(E, rows)), sum ceil(n_e / block_m) <= (end + k (block_m - 1)) /
    block_m, so the spare count is at least (rows - end + k) / block_m > (rows - end) / block_m; with k = 0 every
    tile is spare."""
    ends = group_ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    n_tiles = triton.cdiv(rows, block_m) + min(ends.numel(), rows)
    t = torch.arange(n_tiles, device=ends.device)
    expert = torch.searchsorted(cum, t, right=True)  # == E for spare tiles
    safe = expert.clamp(max=ends.numel() - 1)
    live = starts[safe] + (t - (cum[safe] - tiles[safe])) * block_m
    spare = ends[-1] + (t - cum[-1]) * block_m
    return expert, torch.where(expert < ends.numel(), live, spare), n_tiles


@triton.jit
def schedule_tile(tile_expert_ptr, tile_first_ptr, ends_ptr, M, N_EXPERTS, ROWS: tl.constexpr):
    """A program's tile of `tile_schedule`: (its expert, 0 for a spare tile; whether it is live; its ROWS rows; which
    of them it stores). A live tile stores its expert's rows; a spare one, which must run no K step, stores the
    zeros of its rows past the last expert's end."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    live = expert < N_EXPERTS
    expert = tl.where(live, expert, 0)
    end = tl.where(live, tl.load(ends_ptr + expert).to(tl.int64), M)
    rows = tl.load(tile_first_ptr + tile) + tl.arange(0, ROWS)
    return expert, live, rows, rows < end
