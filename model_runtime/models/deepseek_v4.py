"""The DeepSeek-V4 model (Flash and Pro): embedding, mHC decoder blocks, hyper head, final norm and head.

`model(input_ids)` runs a fresh sequence per row and returns all logits. The incremental API runs over
explicit per-sequence states (`dsv4.model_runtime.state`): `prefill` advances every row by the same number
of tokens from wherever each row's state stands (chunked prefill, or batched decode with S = 1), `decode` is
`prefill` of one token per row.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import Attention, StepContext
from dsv4.model_runtime.layers.mhc import HyperConnection, HyperHead
from dsv4.model_runtime.layers.moe import MoE
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.layers.rope import RopeTable
from dsv4.model_runtime.state import LayerState, SequenceState, new_sequence_state


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
        self, streams: torch.Tensor, token_ids: torch.Tensor, ctx: StepContext, states: list[LayerState]
    ) -> torch.Tensor:
        """streams [B, S, n, d], token_ids [B, S] -> streams [B, S, n, d]."""
        b, s, n, d = streams.shape
        flat = streams.view(b * s, n, d)
        x, post, comb = self.hc_attn.pre(flat)
        a = self.attn(self.attn_norm(x).view(b, s, d), ctx, states).view(b * s, d)
        flat = self.hc_attn.post(a, flat, post, comb)
        x, post, comb = self.hc_ffn.pre(flat)
        f = self.ffn(self.ffn_norm(x), token_ids.reshape(-1))
        return self.hc_ffn.post(f, flat, post, comb).view(b, s, n, d)


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, qat_simulation: bool = True) -> None:
        super().__init__()
        self.cfg, self.qat_simulation = cfg, qat_simulation
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_main = RopeTable(cfg, compressed=False)
        self.rope_compress = RopeTable(cfg, compressed=True)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_state(self) -> SequenceState:
        """A fresh per-sequence state (position 0)."""
        return new_sequence_state(self.cfg, self.device, self.dtype)

    def context(self, states: list[SequenceState], n_tokens: int) -> StepContext:
        starts = torch.tensor([st.position for st in states], dtype=torch.long, device=self.device)
        positions = starts[:, None] + torch.arange(n_tokens, device=self.device)
        return StepContext(
            starts=starts,
            positions=positions,
            rope_main=self.rope_main,
            rope_compress=self.rope_compress,
            cos_sin={False: self.rope_main(positions), True: self.rope_compress(positions)},
            qat=self.qat_simulation,
        )

    def hidden_streams(self, input_ids: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        """Run the decoder blocks: input_ids [B, S] -> residual streams [B, S, n, d] before the hyper head.

        Advances every state by S tokens."""
        if input_ids.dim() != 2 or input_ids.shape[0] != len(states):
            raise ValueError(f"input_ids must be [B, S] with B = len(states) = {len(states)}, got {input_ids.shape}")
        ctx = self.context(states, input_ids.shape[1])
        h = self.embed(input_ids)
        streams = h.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        for i, block in enumerate(self.layers):
            streams = block(streams, input_ids, ctx, [st.layers[i] for st in states])
        for st in states:
            st.position += input_ids.shape[1]
        return streams

    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Residual streams [..., n, d] -> logits [..., vocab] in fp32 (float64 for a float64 model)."""
        lead = streams.shape[:-2]
        h = self.norm(self.hc_head(streams.reshape(-1, *streams.shape[-2:])))
        acc = torch.promote_types(h.dtype, torch.float32)
        return torch.nn.functional.linear(h.to(acc), self.head.weight.to(acc)).view(*lead, -1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, states: list[SequenceState], last_only: bool = False) -> torch.Tensor:
        """Advance each row's state by input_ids [B, S]; logits [B, S, vocab] (or [B, vocab] if last_only)."""
        streams = self.hidden_streams(input_ids, states)
        return self.logits(streams[:, -1]) if last_only else self.logits(streams)

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        """One token per sequence: token_ids [B] -> logits [B, vocab]; each state advances by one."""
        return self.prefill(token_ids.view(-1, 1), states, last_only=True)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A fresh sequence per row: input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        return self.prefill(input_ids, [self.new_state() for _ in range(input_ids.shape[0])])
