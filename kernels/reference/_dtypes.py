"""Accumulation dtype of the reference ops: at least fp32 (float64 inputs stay float64 for precision tests)."""

from __future__ import annotations

import torch


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for 16/32-bit float inputs, float64 for float64 inputs."""
    return torch.promote_types(t.dtype, torch.float32)
