"""The op registry: (op name, backend) -> implementation.

The backend follows the device a model runs on (cpu -> "reference", cuda -> "cuda", npu -> "ascend"); the
environment variable `DSV4_KERNEL_BACKEND` overrides it. `dsv4.kernels.ops.bind` looks a backend's ops up once. A
backend whose device or library is missing, or that has no implementation of the op, raises `KernelBackendError`:
there is never a silent fallback to another backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from dsv4.protocol import env

ENV_BACKEND = env.KERNEL_BACKEND
BACKENDS = ("reference", "cuda", "ascend")
DEVICE_BACKEND = {"cpu": "reference", "cuda": "cuda", "npu": "ascend"}
# Module that registers each backend's implementations when imported.
BACKEND_MODULES = {
    "reference": "dsv4.kernels.reference",
    "cuda": "dsv4.kernels.cuda",
    "ascend": "dsv4.kernels.ascend",
}

F = TypeVar("F", bound=Callable[..., Any])

_IMPLS: dict[tuple[str, str], Callable[..., Any]] = {}
_LOADED: set[str] = set()


class KernelBackendError(RuntimeError):
    """The chosen kernel backend cannot run this op here (unknown, missing device/library, or no implementation)."""


def register(op: str, backend: str) -> Callable[[F], F]:
    """Decorator: register `fn` as the implementation of `op` on `backend`."""
    if backend not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {backend!r}; known: {', '.join(BACKENDS)}")

    def deco(fn: F) -> F:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def backend_for(device: torch.device) -> str:
    """The backend that runs ops on `device`: `DSV4_KERNEL_BACKEND` if set, else the device's own backend."""
    override = os.environ.get(ENV_BACKEND)
    if override:
        if override not in BACKENDS:
            raise KernelBackendError(
                f"{ENV_BACKEND}={override!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}"
            )
        return override
    try:
        return DEVICE_BACKEND[device.type]
    except KeyError:
        raise KernelBackendError(
            f"no kernel backend for device type {device.type!r}; set {ENV_BACKEND} to one of {', '.join(BACKENDS)}"
        ) from None


def _check_cuda_runnable() -> None:
    # Checked on every lookup, not only when the backend is first imported: a process that imported the kernels
    # under the interpreter and later dropped TRITON_INTERPRET must not keep running them on CPU tensors.
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise KernelBackendError("kernel backend 'cuda' needs a CUDA device (or TRITON_INTERPRET=1); none found")


def _check_available(backend: str) -> None:
    if backend == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise KernelBackendError("kernel backend 'cuda' needs the triton package, which is not installed")
        _check_cuda_runnable()
    elif backend == "ascend" and importlib.util.find_spec("torch_npu") is None:
        raise KernelBackendError("kernel backend 'ascend' needs torch_npu (and CANN), which is not installed")


def _load(backend: str) -> None:
    if backend in _LOADED:
        return
    _check_available(backend)
    module = BACKEND_MODULES[backend]
    if importlib.util.find_spec(module) is None:
        raise KernelBackendError(f"kernel backend {backend!r} is not part of this build (no module {module})")
    importlib.import_module(module)
    _LOADED.add(backend)


def lookup(op: str, backend: str) -> Callable[..., Any]:
    """The implementation of `op` on `backend`, importing the backend on first use."""
    if backend not in BACKENDS:
        raise KernelBackendError(f"unknown kernel backend {backend!r}; known: {', '.join(BACKENDS)}")
    _load(backend)
    _check_available(backend)  # again after the first import: the device or library may have gone since
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise KernelBackendError(f"kernel backend {backend!r} has no implementation of op {op!r}") from None


def registered(backend: str) -> list[str]:
    """Names of the ops a backend implements (after importing it)."""
    _load(backend)
    return sorted(op for op, b in _IMPLS if b == backend)
