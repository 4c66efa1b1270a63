"""Targets the launcher tests run on every rank (loaded by path: `rank_targets.py:function`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv4.model_runtime.parallel.rank import RankContext


def report(ctx: RankContext, args: list[str]) -> None:
    """Sum the ranks over the group and write what this rank saw."""
    total = torch.tensor([float(ctx.rank)])
    dist.all_reduce(total)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    seen = {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "world": ctx.world_size,
        "backend": dist.get_backend(),
        "device": str(ctx.device),
        "sum": total.item(),
        "env": {k: os.environ[k] for k in keys},
    }
    (Path(args[0]) / f"rank{ctx.rank}.json").write_text(json.dumps(seen))


def fail_one(ctx: RankContext, args: list[str]) -> int:
    """Rank args[1] fails (exit 3, or SIGKILL of itself with "kill"); the others wait in a collective forever."""
    (Path(args[0]) / f"pid{ctx.rank}").write_text(str(os.getpid()))
    if ctx.rank == int(args[1]):
        time.sleep(1.0)  # let the others reach the collective
        if args[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"rank {ctx.rank}: failing on purpose", file=sys.stderr)
        return 3
    dist.barrier()  # never completes: the failed rank does not arrive
    return 0
