"""mHC: manifold-constrained hyper-connections (n residual streams, Sinkhorn-projected mixing).

Per sub-layer: pre collapses the streams into the sub-layer input, post expands its output, comb mixes the
streams (applied transposed: X'_k = post_k y + sum_j comb[j, k] X_j). The head variant collapses the streams
once, before the final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.ops_module import OpsModule


class HyperConnection(OpsModule):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * cfg.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))
        self.iters, self.hc_eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [N, n, d] -> (x [N, d], post [N, n], comb [N, n, n])."""
        return self.ops.mhc_pre(streams, self.fn, self.scale, self.base, self.iters, self.hc_eps, self.norm_eps)

    def post(self, y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """y [N, d] sub-layer output -> new streams [N, n, d]."""
        return self.ops.mhc_post(y, streams, post, comb)

    def post_pre(
        self, y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, nxt: HyperConnection
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`post` of this sub-layer, then `nxt.pre` of the new streams, in one op: (new streams, x, post', comb')."""
        return self.ops.mhc_post_pre(
            y, streams, post, comb, nxt.fn, nxt.scale, nxt.base, nxt.iters, nxt.hc_eps, nxt.norm_eps
        )


class HyperHead(OpsModule):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n = cfg.hc_mult
        self.fn = nn.Parameter(torch.zeros(n, n * cfg.hidden_size))
        self.base = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))
        self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [N, n, d] -> [N, d]."""
        return self.ops.hc_head(streams, self.fn, self.scale, self.base, self.hc_eps, self.norm_eps)
