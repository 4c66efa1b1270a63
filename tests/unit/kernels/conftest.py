"""Kernel-test fixtures: where the `cuda` backend runs in this process, and the two implementations to compare.

On a machine with a CUDA device the Triton kernels compile for it; elsewhere they run in Triton's interpreter on
CPU tensors. Triton fixes the mode when a kernel is decorated, so `dsv4.kernels.cuda` is imported once, under
TRITON_INTERPRET=1 when there is no GPU, while this conftest loads; afterwards the variable is set only around
each test of this folder, never for the rest of the session.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dsv4.kernels.registry import lookup

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def _set_interpret() -> str | None:
    before = os.environ.get("TRITON_INTERPRET")
    if HAS_GPU:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
    return before


def _restore(before: str | None) -> None:
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


def _import_backend() -> None:
    """Import the backend in this process's Triton mode (test modules import from it at collection)."""
    if "dsv4.kernels.cuda" in sys.modules:
        from dsv4.kernels.cuda.launch import INTERPRETED

        if INTERPRETED == HAS_GPU:
            raise RuntimeError("dsv4.kernels.cuda was imported earlier in this process in the wrong Triton mode")
        return
    before = _set_interpret()
    try:
        importlib.import_module("dsv4.kernels.cuda")
    finally:
        _restore(before)


_import_backend()


@pytest.fixture(autouse=True)
def _triton_mode() -> Iterator[None]:
    before = _set_interpret()
    yield
    _restore(before)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def impls() -> Callable[[str], tuple[Callable[..., Any], Callable[..., Any]]]:
    """impls(op) -> (reference implementation, cuda implementation)."""

    def get(op: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        return lookup(op, "reference"), lookup(op, "cuda")

    return get


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """New float tensors from `torch.empty` start as NaN for the test, so values a kernel must store cannot pass
    by an allocation that happened to hold zeros."""
    empty = torch.empty

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
