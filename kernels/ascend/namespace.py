"""Where the adapters find torch_npu's ops: the real module, or a namespace a test injected."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dsv4.kernels.registry import KernelBackendError

# The torch_npu release whose op schemas the adapters are written and checked against. It needs torch 2.14
# (CPU build) and CANN on the Ascend image; it is not a dependency of this distribution (torch is 2.15 here).
TORCH_NPU_VERSION = "2.14.0"

_injected: list[Any] = []


def npu() -> Any:
    """The op namespace: the innermost injected one, else the imported `torch_npu` (which needs CANN)."""
    if _injected:
        return _injected[-1]
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:  # e.g. libhccl.so missing without CANN: surface the loader's own message
        raise KernelBackendError(f"kernel backend 'ascend' cannot import torch_npu: {e}") from e


@contextmanager
def use_namespace(namespace: Any) -> Iterator[Any]:
    """Route the adapters' torch_npu calls to `namespace` inside the block (tests: schema checks + emulators)."""
    _injected.append(namespace)
    try:
        yield namespace
    finally:
        _injected.pop()
