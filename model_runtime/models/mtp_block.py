"""Multi-token prediction (MTP) module `mtp.i`: predicts token t+2 from the main model's streams at t and token t+1.

X~ = e_proj(enorm(embed[token_{t+1}])) broadcast over the streams + h_proj(hnorm(X_t)) per stream, then one
sliding-window decoder block with a learned router (its own KV window in the sequence state), then the hyper
head `mtp.i.hc_head_*`, `mtp.i.norm` and the shared `head` (deepseek_v4_model.md §3.7, V3 convention).
"""

from __future__ import annotations

import torch

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import StepContext
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.mhc import HyperHead
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.models.block import Block, BlockStates


class MTPBlock(Block):
    """A decoder block (layer num_hidden_layers + i) plus the MTP input projections and its own hyper head."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__(cfg, cfg.num_hidden_layers + index)
        d = cfg.hidden_size
        self.e_proj = Linear(d, d)
        self.h_proj = Linear(d, d)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)

    def predict(
        self,
        streams: torch.Tensor,
        next_embed: torch.Tensor,
        next_ids: torch.Tensor,
        ctx: StepContext,
        states: BlockStates,
    ) -> torch.Tensor:
        """streams [B, S, n, d] (main model, before its head), next_embed [B, S, d] -> hidden [B, S, d] to the head."""
        x = self.e_proj(self.enorm(next_embed)).unsqueeze(2) + self.h_proj(self.hnorm(streams))  # [B, S, n, d]
        out = self(x, next_ids, ctx, states)
        b, s, n, d = out.shape
        return self.norm(self.hc_head(out.view(b * s, n, d))).view(b, s, d)
