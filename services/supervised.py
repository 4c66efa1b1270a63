"""Children of `dsv4 serve` stop when their supervisor dies, even by SIGKILL (which it cannot pass on).

The supervisor names itself in `DSV4_SUPERVISOR_PID`. A child asks the kernel for a SIGTERM when its parent
exits (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere a thread polls the parent pid), so a role drains and exits as
on Ctrl-C. redis-server cannot do this itself; it is started as `python -m dsv4.services.supervised redis-server
…`, which arms the signal and execs it (the setting survives exec on Linux; elsewhere Redis is not covered).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from dsv4.protocol import env

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def supervised_env() -> dict[str, str]:
    """This process's environment for a child that must exit when this process does."""
    return {**os.environ, env.SUPERVISOR_PID: str(os.getpid())}


def exit_with_supervisor() -> None:
    """SIGTERM this process when the supervisor named in the environment exits; nothing without one.

    The variable is removed from this process's environment, so its own children are not bound to a process
    that is not their parent.
    """
    raw = os.environ.pop(env.SUPERVISOR_PID, None)
    if not raw:
        return
    supervisor = int(raw)
    if not _arm_parent_death_signal():
        threading.Thread(target=_watch, args=(supervisor,), name="dsv4-supervisor-watch", daemon=True).start()
    if os.getppid() != supervisor:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def _arm_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)) == 0


def _watch(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """`python -m dsv4.services.supervised PROGRAM ARGS…`: run PROGRAM bound to the supervisor's lifetime."""
    if not argv:
        sys.exit("usage: python -m dsv4.services.supervised PROGRAM [ARGS…]")
    exit_with_supervisor()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
