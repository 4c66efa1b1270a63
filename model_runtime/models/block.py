"""DeepSeek-V4 decoder blocks: mHC around attention, mHC around the MoE, and the loop that runs them in order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import Attention, StepContext
from dsv4.model_runtime.layers.mhc import HyperConnection
from dsv4.model_runtime.layers.moe import MoE
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.state import LayerState, PagedLayerView

BlockStates = list[LayerState] | PagedLayerView


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
        self, streams: torch.Tensor, token_ids: torch.Tensor, ctx: StepContext, states: BlockStates
    ) -> torch.Tensor:
        """streams [B, S, n, d], token_ids [B, S] -> streams [B, S, n, d] (states: per sequence, or the paged pool
        of a decode step)."""
        return run_blocks([self], streams, token_ids, ctx, lambda _: states)


def run_blocks(
    blocks: Sequence[Block],
    streams: torch.Tensor,
    token_ids: torch.Tensor,
    ctx: StepContext,
    states_of: Callable[[int], BlockStates],
) -> torch.Tensor:
    """Run `blocks` in order: streams [B, S, n, d], token_ids [B, S] -> streams [B, S, n, d]; block i reads and
    writes `states_of(i)`.

    Every boundary between two sub-layers (attention -> MoE inside a block, MoE -> the next block's attention) is
    one `mhc_post_pre`: a backend writes the new streams and computes the next pre-mapping's mixing in one pass
    over them (2L - 1 boundaries for L blocks: on the cuda backend, 85 fewer kernels in a decode step of Flash)."""
    b, s, n, d = streams.shape
    ids = token_ids.reshape(-1)
    flat = streams.view(b * s, n, d)
    x, post, comb = blocks[0].hc_attn.pre(flat)
    for i, block in enumerate(blocks):
        a = block.attn(block.attn_norm(x).view(b, s, d), ctx, states_of(i)).view(b * s, d)
        flat, x, post, comb = block.hc_attn.post_pre(a, flat, post, comb, block.hc_ffn)
        f = block.ffn(block.ffn_norm(x), ids)
        if i + 1 < len(blocks):
            flat, x, post, comb = block.hc_ffn.post_pre(f, flat, post, comb, blocks[i + 1].hc_attn)
        else:
            flat = block.hc_ffn.post(f, flat, post, comb)
    return flat.view(b, s, n, d)
