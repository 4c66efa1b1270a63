"""One rank process of a group (started by `parallel.launch`): set the device from LOCAL_RANK, join the process
group with the device's backend (gloo on CPU, nccl on NVIDIA, hccl on Ascend), run the target, leave the group.

    python -m dsv4.model_runtime.parallel.rank TARGET [ARGS...]     # with the torchrun env set

TARGET is "module:function" or "path/to/file.py:function"; the function is called as `function(ctx, args)` with
this rank's `RankContext` and the remaining arguments, and may return an exit status.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dsv4.model_runtime.parallel.group import backend_for
from dsv4.model_runtime.parallel.launch import LaunchError
from dsv4.protocol import env

JOIN_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that never joins fails the group instead of hanging it


@dataclass(frozen=True)
class RankContext:
    """Who this process is in its group, and the device it runs on."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_leader(self) -> bool:
        """Rank 0: it owns the engine's scheduler, Redis, the handoff and /metrics."""
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None:
        raise LaunchError(f"{name} is not set: start ranks through dsv4.model_runtime.parallel.launch")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r}: not an integer") from None


def init_rank(environ: Mapping[str, str] | None = None) -> RankContext:
    """Set this process's device from LOCAL_RANK and join the group of the torchrun env (device type from
    DSV4_DEVICE: cpu, cuda or npu)."""
    e = os.environ if environ is None else environ
    rank, local, world = _int(e, env.RANK), _int(e, env.LOCAL_RANK), _int(e, env.WORLD_SIZE)
    local_world = _int(e, env.LOCAL_WORLD_SIZE)
    kind = (e.get(env.DEVICE) or "cpu").split(":")[0]
    if kind == "cpu":
        device = torch.device("cpu")
    elif kind == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif kind == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and the hccl backend)

        device = torch.device("npu", local)
        torch.npu.set_device(device)  # type: ignore[attr-defined]
    else:
        raise LaunchError(f"{env.DEVICE}={kind!r}: the device type of a rank is cpu, cuda or npu")
    dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=JOIN_TIMEOUT)
    return RankContext(rank, local, world, local_world, device)


def resolve(target: str) -> Callable[..., Any]:
    """The function named by "module:function" or "path/to/file.py:function"."""
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise LaunchError(f"target {target!r}: expected module:function or path/to/file.py:function")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec is None or spec.loader is None:
            raise LaunchError(f"target {target!r}: cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LaunchError(f"target {target!r}: {where} has no function {name!r}")
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """Run one rank: join, call the target, leave; returns the target's exit status (0 when it returns None)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m dsv4.model_runtime.parallel.rank TARGET [ARGS...]", file=sys.stderr)
        return 2
    fn = resolve(args[0])
    ctx = init_rank()
    try:
        status = int(fn(ctx, args[1:]) or 0)
    except BaseException:
        traceback.print_exc()
        status = 1
    if status:
        # Fail fast, before the peers notice the broken group: the launcher names the first rank to exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    # Every rank reaches this point before any tears its connections down: rank 0 returns as soon as it has sent
    # its followers their last message, and a gloo rank that destroyed its group while a peer was still reading
    # from it was seen to abort (SIGABRT, "terminate called without an active exception") once in a dozen runs.
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
