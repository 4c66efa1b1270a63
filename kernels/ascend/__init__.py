"""The `ascend` kernel backend: adapters from our op contracts onto torch_npu ops. NOT RUN ON ASCEND HARDWARE.

Importing this package registers the adapters; the registry only selects them when torch_npu (with CANN) is
importable, and never falls back. Every adapter calls its torch_npu ops through `namespace.npu()`, so CPU tests
inject a namespace that checks each call against the op schemas shipped in the pinned torch_npu wheel and
computes it with emulations written from Huawei's documented formulas (tests/unit/kernels/ascend). What that
does and does not prove is in kernels/CAPABILITIES.md.
"""

from dsv4.kernels.ascend import adapters
from dsv4.kernels.ascend.namespace import TORCH_NPU_VERSION

__all__ = ["TORCH_NPU_VERSION", "adapters"]
