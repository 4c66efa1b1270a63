"""The rank launcher: start one rank process per device of this pod, torchrun-style, and keep the group
all-or-nothing.

    python -m dsv4.model_runtime.parallel.launch [--nproc-per-node N] [--device cpu|cuda|npu] TARGET [ARGS...]

The group comes from the environment the operator (or `dsv4 serve`) sets on every pod of a group: MASTER_ADDR,
MASTER_PORT, WORLD_SIZE, NODE_RANK, NPROC_PER_NODE (flags override them; a single pod needs none of them). Rank
process i gets RANK = NODE_RANK * NPROC_PER_NODE + i, LOCAL_RANK = i, LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT, and runs `dsv4.model_runtime.parallel.rank` on TARGET ("module:function" or
"path/to/file.py:function"): it sets its device from LOCAL_RANK, joins the process group (gloo / nccl / hccl)
and calls the function with its `RankContext` and ARGS.

A rank that exits with an error or a signal ends the whole group: the launcher logs one line naming the rank,
its pid and how it ended, stops the other ranks (SIGTERM, then SIGKILL after a grace period) and exits non-zero,
so the pod restarts and no group is left half alive holding leases. SIGTERM/SIGINT to the launcher are passed on
to every rank; a rank outlives a killed launcher by nothing (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dsv4.protocol import env

log = logging.getLogger("dsv4.launch")

RANK_MODULE = "dsv4.model_runtime.parallel.rank"
DEFAULT_MASTER_PORT = 29500
GRACE_S = 10.0
POLL_S = 0.5  # the longest wait between checks when no rank exits
_PR_SET_PDEATHSIG = 1


class LaunchError(ValueError):
    """The group's environment or flags cannot describe a group; the message names the variable."""


@dataclass(frozen=True)
class GroupEnv:
    """This pod's place in its rank group."""

    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    world_size: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise LaunchError(f"{env.NPROC_PER_NODE}={self.nproc_per_node}: must be >= 1")
        if self.node_rank < 0 or (self.node_rank + 1) * self.nproc_per_node > self.world_size:
            raise LaunchError(
                f"{env.NODE_RANK}={self.node_rank} with {env.NPROC_PER_NODE}={self.nproc_per_node} needs ranks up to "
                f"{(self.node_rank + 1) * self.nproc_per_node - 1}, but {env.WORLD_SIZE}={self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"{env.MASTER_PORT}={self.master_port}: not a port")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> GroupEnv:
        """The group of the environment (unset variables: a one-pod group), with non-None `overrides` applied."""
        e = os.environ if environ is None else environ

        def num(name: str, default: int) -> int:
            raw = e.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise LaunchError(f"{name}={raw!r}: not an integer") from None

        nproc = num(env.NPROC_PER_NODE, 1)
        values: dict[str, object] = {
            "master_addr": e.get(env.MASTER_ADDR) or "127.0.0.1",
            "master_port": num(env.MASTER_PORT, DEFAULT_MASTER_PORT),
            "node_rank": num(env.NODE_RANK, 0),
            "nproc_per_node": nproc,
        }
        values |= {k: v for k, v in overrides.items() if v is not None}
        values["world_size"] = overrides.get("world_size") or num(
            env.WORLD_SIZE,
            int(values["nproc_per_node"]),  # type: ignore[call-overload]
        )
        return cls(**values)  # type: ignore[arg-type]

    def rank_env(self, local_rank: int) -> dict[str, str]:
        """The torchrun variables of local rank `local_rank`."""
        return {
            env.MASTER_ADDR: self.master_addr,
            env.MASTER_PORT: str(self.master_port),
            env.WORLD_SIZE: str(self.world_size),
            env.NODE_RANK: str(self.node_rank),
            env.NPROC_PER_NODE: str(self.nproc_per_node),
            env.RANK: str(self.node_rank * self.nproc_per_node + local_rank),
            env.LOCAL_RANK: str(local_rank),
            env.LOCAL_WORLD_SIZE: str(self.nproc_per_node),
        }


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the launcher dies, so no rank outlives it (Linux, where pods run;
    elsewhere only the launcher's forwarding of SIGTERM stops the ranks)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(
    target: str,
    args: Sequence[str],
    group: GroupEnv,
    device: str = "cpu",
    extra_env: Mapping[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> int:
    """Run TARGET on this pod's ranks of `group` until all exit; returns 0, or non-zero as soon as one rank failed
    (after stopping the others)."""
    base = dict(os.environ) | dict(extra_env or {}) | {env.DEVICE: device}
    procs: list[subprocess.Popen[bytes]] = []
    for local in range(group.nproc_per_node):
        cmd = [sys.executable, "-m", RANK_MODULE, target, *args]
        procs.append(subprocess.Popen(cmd, env=base | group.rank_env(local), preexec_fn=_die_with_parent))
    first = group.node_rank * group.nproc_per_node
    log.info(
        "started ranks %d..%d of %d on %s (pids %s)",
        first,
        first + len(procs) - 1,
        group.world_size,
        device,
        [p.pid for p in procs],
    )
    stop_by: list[float] = []  # set when a signal asks the group to stop: SIGKILL after this moment

    def forward(signum: int, _frame: object) -> None:
        if not stop_by:
            stop_by.append(time.monotonic() + grace_s)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    # Wake on SIGCHLD rather than on a timer alone: a failed rank is seen before the ranks its exit brings down
    # (their collectives break a moment later), so the log names the rank that failed first.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while True:
            for local, p in enumerate(procs):
                code = p.poll()
                if code is not None and code != 0 and not stop_by:
                    others = [q for q in procs if q.poll() is None]
                    log.error(
                        "rank %d (local rank %d, pid %d) %s; stopping the group (%d other ranks on this pod)",
                        first + local,
                        local,
                        p.pid,
                        _ended(code),
                        len(others),
                    )
                    _stop(others, grace_s)
                    return code if code > 0 else 128 - code
            if all(p.poll() is not None for p in procs):
                codes = [p.returncode for p in procs]
                bad = next((c for c in codes if c != 0), 0)
                return 0 if not bad else (bad if bad > 0 else 128 - bad)
            if stop_by and time.monotonic() > stop_by[0]:
                _stop([p for p in procs if p.poll() is None], 0.0)
            signal.sigtimedwait({signal.SIGCHLD}, POLL_S)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for s, handler in old.items():
            signal.signal(s, handler)


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whoever is still alive after `grace_s`; waits for all of them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsv4.model_runtime.parallel.launch",
        description="Start one rank process per device of this pod (torchrun-style env) and run TARGET on each.",
    )
    p.add_argument(
        "--nproc-per-node", type=int, help=f"rank processes on this pod (env {env.NPROC_PER_NODE}, default 1)"
    )
    p.add_argument("--nnodes", type=int, help=f"pods in the group: WORLD_SIZE = nnodes x nproc (env {env.WORLD_SIZE})")
    p.add_argument("--node-rank", type=int, help=f"this pod's index in the group (env {env.NODE_RANK}, default 0)")
    p.add_argument("--master-addr", help=f"the group leader's address (env {env.MASTER_ADDR}, default 127.0.0.1)")
    p.add_argument("--master-port", type=int, help=f"rendezvous port (env {env.MASTER_PORT}, default 29500)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "npu"),
        default=None,
        help=f"device type of the ranks: rank i uses device i (env {env.DEVICE}, default cpu)",
    )
    p.add_argument("--grace", type=float, default=GRACE_S, help="seconds a stopped rank gets before SIGKILL")
    p.add_argument("target", help='"module:function" or "path/to/file.py:function", called with (RankContext, args)')
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to TARGET")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher's command line; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        nproc = a.nproc_per_node
        world = a.nnodes * (nproc or int(os.environ.get(env.NPROC_PER_NODE) or 1)) if a.nnodes else None
        group = GroupEnv.from_env(
            nproc_per_node=nproc,
            node_rank=a.node_rank,
            master_addr=a.master_addr,
            master_port=a.master_port,
            world_size=world,
        )
    except LaunchError as e:
        print(f"dsv4 launch: {e}", file=sys.stderr)
        return 2
    device = a.device or (os.environ.get(env.DEVICE) or "cpu").split(":")[0]
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    return launch(a.target, args, group, device, grace_s=a.grace)


if __name__ == "__main__":
    sys.exit(main())
