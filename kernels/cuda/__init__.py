"""The `cuda` kernel backend: Triton kernels for NVIDIA GPUs, importing this package registers them.

Importing with `TRITON_INTERPRET=1` runs every kernel in Triton's CPU interpreter on CPU tensors (the CPU test
mode, fp32 only: the interpreter computes bf16 and fp32->fp8 casts wrongly). Selecting this backend for CPU
tensors is always explicit: `DSV4_KERNEL_BACKEND=cuda` together with `TRITON_INTERPRET=1`.
"""

# grouped_scaled registers nothing (a candidate the GPU benchmark times); imported with the others so that its
# kernel is decorated in the same Triton mode
from dsv4.kernels.cuda import attention, grouped_scaled, linear, mhc, moe, norm_rope, paged, sampling

__all__ = ["attention", "grouped_scaled", "linear", "mhc", "moe", "norm_rope", "paged", "sampling"]
