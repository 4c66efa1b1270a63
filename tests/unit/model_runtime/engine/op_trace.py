"""What one engine step dispatches and what it reads on the host: aten ops by name (a `TorchDispatchMode`) and
every Python-level read of tensor values (a `TorchFunctionMode`), for the decode-step tests."""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output size or result depends on tensor values: on a GPU each waits for the device (a host sync).
SYNCING_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.argwhere.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.bincount.default",
    "aten.repeat_interleave.Tensor",
    "aten.equal.default",
    "aten.is_nonzero.default",
    "aten.allclose.default",
}
# Tensor methods that hand values (or the tensor) to the host.
HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "__array__"}


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class OpTrace(TorchDispatchMode):
    """Counts dispatched aten ops; records the ones that would sync a GPU (value-dependent shapes or scalars,
    boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        self.ops[name] += 1
        if name in SYNCING_OPS or (name.startswith(("aten.index.", "aten.index_put")) and _bool_index(args)):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Records every read of tensor values on the host: (method, the values read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, Any]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "to" and _to_host(args, kwargs or {})):
            self.reads.append((name, out))
        return out


def _to_host(args: Any, kwargs: dict[str, Any]) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any(str(t).startswith("cpu") for t in targets if isinstance(t, str | torch.device))


def op_differences(a: collections.Counter[str], b: collections.Counter[str]) -> dict[str, tuple[int, int]]:
    """The ops two traces dispatched a different number of times: op -> (count in a, count in b)."""
    return {op: (a[op], b[op]) for op in a.keys() | b.keys() if a[op] != b[op]}
