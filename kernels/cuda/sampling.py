"""Sampling on the `cuda` backend: the PyTorch reference run as torch ops on the GPU tensors, no Triton kernel.

Sampling is one [B, V] pass per step, small next to the model; a fused top-k/top-p kernel is left until a GPU
profile shows it matters. Registered explicitly (kernels/CAPABILITIES.md says so), so it is no fallback.
"""

from dsv4.kernels.reference import sampling as ref_sampling
from dsv4.kernels.registry import register

register("filter_logits", "cuda")(ref_sampling.filter_logits)
register("sample_tokens", "cuda")(ref_sampling.sample_tokens)
