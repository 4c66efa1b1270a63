"""RMSNorm with a learned weight (fp32 math, output in the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.layers.ops_module import OpsModule


class RMSNorm(OpsModule):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)
