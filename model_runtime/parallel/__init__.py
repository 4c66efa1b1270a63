"""Tensor parallel attention and expert parallel MoE over torch.distributed, and a loader that reads only each
rank's shard. gloo on CPU (tests), NCCL on NVIDIA, HCCL on Ascend (`group.backend_for`)."""

from dsv4.model_runtime.parallel.group import ParallelConfig, backend_for
from dsv4.model_runtime.parallel.rank_loader import load_parallel_model

__all__ = ["ParallelConfig", "backend_for", "load_parallel_model"]
