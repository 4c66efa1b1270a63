"""dsv4 kernels: one op registry with a PyTorch reference and `cuda` (Triton) / `ascend` (torch_npu) backends."""
