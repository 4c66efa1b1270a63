"""Ascend adapter fixtures: the pinned torch_npu wheel's op schemas and a checked, emulated op namespace.

The wheel is downloaded once (pip download from PyPI, ~44 MB) into ~/.cache/dsv4/wheels (or $DSV4_CACHE/wheels)
and read as a zip; torch_npu is never installed or imported (it needs CANN).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsv4.kernels.ascend.namespace import TORCH_NPU_VERSION, use_namespace

from . import emulation
from .schema import Schema, SchemaError, load_schemas


def wheel_path() -> Path:
    """The pinned torch_npu wheel (cp311, x86_64) in the cache, downloaded on first use."""
    cache = Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4")) / "wheels"
    pattern = f"torch_npu-{TORCH_NPU_VERSION}-cp311-cp311-manylinux*_x86_64.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(cache),
            f"torch-npu=={TORCH_NPU_VERSION}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(cache.glob(pattern))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"could not download torch-npu=={TORCH_NPU_VERSION}: {done.stderr[-2000:]}")
    return found[-1]


@pytest.fixture(scope="session")
def schemas() -> dict[str, Schema]:
    return load_schemas(wheel_path())


class CheckedNamespace:
    """torch_npu stand-in: each call is bound against the wheel's schema, recorded, then emulated."""

    def __init__(self, schemas: dict[str, Schema]) -> None:
        self.schemas = schemas
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in self.schemas:
            raise SchemaError(f"torch_npu {TORCH_NPU_VERSION} has no op {name!r}")
        schema = self.schemas[name]
        emulate = getattr(emulation, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = schema.bind(args, kwargs)
            self.calls.append((name, bound))
            return emulate(**bound)

        return call


@pytest.fixture
def npu_ops(schemas: dict[str, Schema]) -> Iterator[CheckedNamespace]:
    """Inject the checked namespace into the adapters for one test."""
    with use_namespace(CheckedNamespace(schemas)) as ns:
        yield ns
