"""PyTorch reference implementations of every op in `dsv4.kernels.ops` (any device; the semantics' definition)."""

from dsv4.kernels.reference import attention, fused, linear, mhc, moe, norm_rope, paged, quant_moe, sampling

__all__ = ["attention", "fused", "linear", "mhc", "moe", "norm_rope", "paged", "quant_moe", "sampling"]
