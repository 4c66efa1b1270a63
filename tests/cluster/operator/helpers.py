"""Polling and kubectl helpers shared by the operator's cluster tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.cluster.control_plane import KubeCluster


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.3) -> Any:
    """Poll `check()` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def get_json(cluster: KubeCluster, *args: str) -> Any:
    """`kubectl get ARGS -o json`, parsed."""
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
