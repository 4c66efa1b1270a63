"""The role processes of `dsv4 serve`: how they are configured and started, when they are ready, how they stop,
and the loop that watches them (and the broker) until a signal arrives.

Every role runs in its own process group, so a terminal's Ctrl-C reaches only the supervisor, which stops the roles
in order: SIGTERM to all (the gateway lets open streams finish, the workers drain), SIGKILL after a grace period
or on a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from dsv4.protocol import contract, env
from dsv4.services.local_redis import free_port
from dsv4.services.serve.brokers import BrokerWatch
from dsv4.services.serve.errors import Interrupted, ServeError
from dsv4.services.supervised import supervised_env

DRAIN_TIMEOUT_S = "20"
SUPERVISE_POLL_S = 0.2


@dataclass
class RoleProcess:
    """One `dsv4 <role>` child process; its log goes to `log_path`."""

    name: str
    args: list[str]
    env: dict[str, str]
    ready_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the roles in order.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dsv4.services.cli", self.name, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    @property
    def title(self) -> str:
        return self.name if self.name == contract.Role.GATEWAY.value else f"{self.name} worker"

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def last_error(self) -> str:
        """The most telling line of the log: the last one naming an error, else the last one."""
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["(empty log)"])[-1]


def role_processes(
    args: argparse.Namespace, model: Path, redis_url: str, in_process_broker: bool, log_dir: Path
) -> list[RoleProcess]:
    """The gateway, `--prefill-workers` prefill workers and one decode worker, configured for this machine (with
    `--tensor-parallel N` and `--data-parallel M`, each worker a group of N x M ranks)."""
    base = supervised_env()
    base[env.MODEL] = str(model)  # the gateway reads the checkpoint's tokenizer
    workers = dict(base)
    ranks = args.tensor_parallel * args.data_parallel
    # The engines' ranks share the cores: give each its part, unless the user chose (torch reads OMP_NUM_THREADS).
    threads = (os.cpu_count() or 2) // ((args.prefill_workers + 1) * ranks)
    workers.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    workers.setdefault(env.DRAIN_TIMEOUT_S, DRAIN_TIMEOUT_S)
    workers.setdefault(env.HOST, "127.0.0.1")
    workers.setdefault(env.POD_IP, "127.0.0.1")
    gateway_env = dict(base)
    if in_process_broker:
        # The broker is slow with multi-MiB values: KV state goes worker to worker, Redis carries the descriptor.
        workers.setdefault(f"{env.KV_HANDOFF}__TRANSPORT", "direct")
    if args.no_prefix_cache:
        workers[f"{env.PREFIX_CACHE}__ENABLED"] = "false"
        gateway_env[f"{env.PREFIX_ROUTING}__ENABLED"] = "false"
    if args.max_num_seqs is not None:
        workers[f"{env.ENGINE}__MAX_NUM_SEQS"] = str(args.max_num_seqs)
    if args.max_num_batched_tokens is not None:
        workers[f"{env.ENGINE}__MAX_NUM_BATCHED_TOKENS"] = str(args.max_num_batched_tokens)
    if args.no_cuda_graphs:
        workers[f"{env.ENGINE}__CUDA_GRAPHS"] = "false"
    if args.no_overlap_scheduling:
        workers[f"{env.ENGINE}__OVERLAP_SCHEDULING"] = "false"
    if args.speculative_mtp:
        workers[f"{env.ENGINE}__SPECULATIVE_MTP"] = "true"
    budget = args.prefix_cache_budget
    if budget is None and in_process_broker:
        budget = 0  # prefixes are multi-MiB values too: no shared tier unless asked for
    if budget is not None:
        workers[f"{env.PREFIX_CACHE}__TIER__BUDGET_BYTES"] = str(budget)
    gateway_args = ["--host", args.host, "--port", str(args.port), "--redis-url", redis_url]
    if args.api_key_file:
        gateway_args += ["--api-key-file", str(Path(args.api_key_file).resolve())]
    gateway_url = http_url(args.host, args.port)
    roles = [RoleProcess("gateway", gateway_args, gateway_env, gateway_url, log_dir / "gateway.log")]
    names = [contract.Role.PREFILL.value] * args.prefill_workers + [contract.Role.DECODE.value]
    for i, name in enumerate(names):
        port = free_port()
        role_env = {**workers, env.PORT: str(port), env.POD_NAME: f"{name}-local-{port}"}
        if ranks > 1:  # each worker a group of its own on this machine, as the operator sets a one-pod group
            role_env |= {
                env.WORLD_SIZE: str(ranks),
                env.NPROC_PER_NODE: str(ranks),
                env.NODE_RANK: "0",
                env.MASTER_ADDR: "127.0.0.1",
                env.MASTER_PORT: str(free_port()),
                f"{env.PARALLELISM}__TENSOR": str(args.tensor_parallel),
                f"{env.PARALLELISM}__DATA": str(args.data_parallel),
                f"{env.PARALLELISM}__EXPERT": str(args.data_parallel > 1).lower(),
            }
        ready = f"http://127.0.0.1:{port}"
        log = (
            f"{name}-{i + 1}.log" if name == contract.Role.PREFILL.value and args.prefill_workers > 1 else f"{name}.log"
        )
        roles.append(RoleProcess(name, ["--redis-url", redis_url], role_env, ready, log_dir / log))
    return roles


def http_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def wait_ready(roles: list[RoleProcess], timeout: float, check: Callable[[], None]) -> None:
    """Return once every role answers 200 on /readyz; ServeError when one exits or the time runs out (`check` is
    called while waiting and may raise)."""
    deadline = time.monotonic() + timeout
    waiting = list(roles)
    with httpx.Client(timeout=1.0) as http:
        while waiting:
            check()
            for role in list(waiting):
                code = role.exited()
                if code is not None:
                    raise ServeError(f"the {role.title} exited with status {code} while starting: {role.last_error()}")
                try:
                    if http.get(role.ready_url + contract.READY_PATH).status_code == 200:
                        waiting.remove(role)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                names = ", ".join(r.name for r in waiting)
                raise ServeError(f"not ready after {timeout:.0f} s: {names} (logs in {roles[0].log_path.parent})")
            if waiting:
                time.sleep(0.1)


def stop_roles(roles: list[RoleProcess], grace: float, forced: Callable[[], bool]) -> None:
    """SIGTERM every running role, wait up to `grace` (less once `forced()`), then SIGKILL what is left."""
    running = [r for r in roles if r.proc is not None and r.proc.poll() is None]
    for r in running:
        assert r.proc is not None
        r.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(r.proc is not None and r.proc.poll() is None for r in running):
        if time.monotonic() > deadline or forced():
            break
        time.sleep(0.05)
    for r in running:
        assert r.proc is not None
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait()


class Signals:
    """Counts SIGINT/SIGTERM. Nothing is interrupted in the middle: the start-up steps call `check()` between
    steps and in their waits (an exception raised inside an import or a write would leave half-done state)."""

    def __init__(self) -> None:
        self.count = 0

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def check(self) -> None:
        if self.count:
            raise Interrupted

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def supervise(roles: list[RoleProcess], broker: BrokerWatch, signals: Signals) -> int:
    """Wait for a signal (status 0); restart the broker when it dies; raise ServeError when a role dies or the broker
    cannot be kept up."""
    while signals.count == 0:
        for role in roles:
            code = role.exited()
            if code is not None:
                raise ServeError(f"the {role.title} exited with status {code}: {role.last_error()}; stopping")
        broker.check()
        time.sleep(SUPERVISE_POLL_S)
    return 0
