"""RoPE tables: plain θ on sliding-window layers, θ' + YaRN on compressed layers (one table per layer type).

Only the frequencies live here; the rotation (interleaved pairs on the last rope dims) is `dsv4.kernels.ops.rope`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig, yarn_correction_range


def inv_freq(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """Inverse frequencies [rd/2] fp32 of the table for SWA layers (compressed=False) or CSA/HCA layers."""
    rd = cfg.qk_rope_head_dim
    theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
    pos_freqs = theta ** (torch.arange(0, rd, 2, dtype=torch.float) / rd)
    if not compressed or cfg.rope_scaling is None:
        return 1.0 / pos_freqs
    low, high = yarn_correction_range(cfg, rd, theta)
    span = high - low if high != low else 0.001
    ramp = ((torch.arange(rd // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    keep = 1 - ramp  # 1 = unscaled frequency (high-frequency pairs), 0 = frequency / factor
    return 1.0 / (cfg.rope_scaling.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


class RopeTable(nn.Module):
    """cos/sin of position * inv_freq for one layer type."""

    def __init__(self, cfg: ModelConfig, compressed: bool) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq(cfg, compressed), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] int64 -> (cos, sin) [B, S, rd/2] fp32."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return angles.cos(), angles.sin()
