"""One DeepSeek-V4 decoder block: mHC around attention, mHC around the MoE."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import Attention, StepContext
from dsv4.model_runtime.layers.mhc import HyperConnection
from dsv4.model_runtime.layers.moe import MoE
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.state import LayerState, PagedLayerView


class Block(nn.Module):
    """One decoder block: mHC around attention, mHC around the MoE."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.hc_attn = HyperConnection(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.hc_ffn = HyperConnection(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, hashed=cfg.is_hash_layer(layer))

    def forward(
        self,
        streams: torch.Tensor,
        token_ids: torch.Tensor,
        ctx: StepContext,
        states: list[LayerState] | PagedLayerView,
    ) -> torch.Tensor:
        """streams [B, S, n, d], token_ids [B, S] -> streams [B, S, n, d] (states: per sequence, or the paged pool
        of a decode step)."""
        b, s, n, d = streams.shape
        flat = streams.view(b * s, n, d)
        x, post, comb = self.hc_attn.pre(flat)
        a = self.attn(self.attn_norm(x).view(b, s, d), ctx, states).view(b * s, d)
        flat = self.hc_attn.post(a, flat, post, comb)
        x, post, comb = self.hc_ffn.pre(flat)
        f = self.ffn(self.ffn_norm(x), token_ids.reshape(-1))
        return self.hc_ffn.post(f, flat, post, comb).view(b, s, n, d)
