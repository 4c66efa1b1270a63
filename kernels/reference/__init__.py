"""PyTorch reference implementations of every op in `dsv4.kernels.ops` (any device; the semantics' definition)."""

from dsv4.kernels.reference import attention, mhc, moe, norm_rope

__all__ = ["attention", "mhc", "moe", "norm_rope"]
