"""Layers that call kernel ops, and how a model binds them to one backend.

A layer's forward pass calls `self.ops.<op>(...)`; `bind_ops` gives every such layer of a model the same `Ops` (one
backend, every implementation looked up once). A layer that runs before its model was bound raises instead of
guessing a backend.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dsv4.kernels.ops import Ops
from dsv4.kernels.registry import KernelBackendError


class _Unbound:
    def __getattr__(self, name: str) -> Any:
        raise KernelBackendError(
            f"kernel op {name!r} called before the model's ops were bound (DeepseekV4.bind_ops after loading)"
        )


class OpsModule(nn.Module):
    """A module whose forward pass calls kernel ops through `self.ops`."""

    ops: Ops = _Unbound()  # type: ignore[assignment]


def bind_ops(root: nn.Module, ops: Ops) -> None:
    """Give every `OpsModule` inside `root` (root included) the ops `ops`."""
    for module in root.modules():
        if isinstance(module, OpsModule):
            module.ops = ops
