"""The DeepSeek-V4 model (Flash and Pro): embedding, mHC decoder blocks, hyper head, final norm and head.

`model(input_ids)` runs a fresh sequence per row and returns all logits. The incremental API runs over
explicit per-sequence states (`dsv4.model_runtime.state`): `prefill` advances every row by the same number
of tokens from wherever each row's state stands (chunked prefill, or batched decode with S = 1), `decode` is
`prefill` of one token per row. `decode_paged` is the engine's decode step: one token per row over the paged KV
pool, every input a device tensor, a fixed sequence of ops (no host sync, nothing per row), so it can be
captured in a CUDA graph. `paged_streams` and `mtp_paged` are the same over S tokens per row: the engine's MTP
verification step (the last token and the draft).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from dsv4.kernels.ops import bind as bind_backend
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import StepContext
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.mhc import HyperHead
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.layers.ops_module import OpsModule, bind_ops
from dsv4.model_runtime.layers.rope import RopeTable
from dsv4.model_runtime.models.block import Block, BlockStates, run_blocks
from dsv4.model_runtime.models.mtp_block import MTPBlock
from dsv4.model_runtime.state import PagedDecode, SequenceState, new_sequence_state


class DeepseekV4(OpsModule):
    def __init__(
        self, cfg: ModelConfig, qat_simulation: bool = True, mtp: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.cfg, self.qat_simulation = cfg, qat_simulation
        self.compute_dtype = dtype  # activations and KV state; weights keep the checkpoint's formats
        self.weight_signature: list[str] = []  # what the loader stored: "name:logical shape:format" per tensor
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rope_main = RopeTable(cfg, compressed=False)
        self.rope_compress = RopeTable(cfg, compressed=True)
        self.mtp = nn.ModuleList(MTPBlock(cfg, i) for i in range(cfg.num_nextn_predict_layers if mtp else 0))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def blocks(self) -> Sequence[Block]:
        """The decoder blocks in order (`layers`, typed: an nn.ModuleList yields Modules)."""
        return cast("Sequence[Block]", self.layers)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV state)."""
        return self.compute_dtype

    def bind_ops(self, backend: str | None = None) -> None:
        """Bind every layer's kernel ops for the model's device: `backend`, else `DSV4_KERNEL_BACKEND`, else the
        device's own backend (the loaders call it; call it again after moving the model or to switch backends)."""
        bind_ops(self, bind_backend(self.device, backend))

    def new_state(self) -> SequenceState:
        """A fresh per-sequence state (position 0)."""
        return new_sequence_state(self.cfg, self.device, self.dtype, mtp=len(self.mtp) > 0)

    def context(self, starts_list: list[int], n_tokens: int) -> StepContext:
        starts = torch.tensor(starts_list, dtype=torch.long, device=self.device)
        positions = starts[:, None] + torch.arange(n_tokens, device=self.device)
        return self._context(starts, list(starts_list), positions)

    def _context(self, starts: torch.Tensor, start_list: list[int] | None, positions: torch.Tensor) -> StepContext:
        return StepContext(
            starts=starts,
            start_list=start_list,
            positions=positions,
            rope_main=self.rope_main,
            rope_compress=self.rope_compress,
            cos_sin={False: self.rope_main(positions), True: self.rope_compress(positions)},
            qat=self.qat_simulation,
        )

    @torch.no_grad()
    def decode_paged(self, token_ids: torch.Tensor, step: PagedDecode) -> torch.Tensor:
        """One token per row over the paged pool: token_ids [B] int64 at step.positions -> logits [B, vocab].

        Writes each row's window, compressor and entry rows in the pool; the caller advances its bookkeeping."""
        return self.head_logits(self.decode_paged_hidden(token_ids, step))

    @torch.no_grad()
    def decode_paged_hidden(self, token_ids: torch.Tensor, step: PagedDecode) -> torch.Tensor:
        """`decode_paged` up to the head: the head's input [B, d] (what a decode graph captures)."""
        return self.final_hidden(self.paged_streams(token_ids.view(-1, 1), step)[:, -1])

    @torch.no_grad()
    def paged_streams(self, token_ids: torch.Tensor, step: PagedDecode) -> torch.Tensor:
        """S tokens per row over the paged pool: token_ids [B, S] int64, the first at step.positions -> the
        residual streams [B, S, n, d] before the hyper head (S = 2: an MTP verification step, whose second token's
        pool writes `step.undo` can take back)."""
        ctx = self._paged_context(step, token_ids.shape[1])
        streams = self.embed(token_ids).unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        return run_blocks(self.blocks, streams, token_ids, ctx, step.layer)

    @torch.no_grad()
    def mtp_paged(self, streams: torch.Tensor, next_ids: torch.Tensor, step: PagedDecode) -> torch.Tensor:
        """`mtp_logits` over the paged pool: the main streams [B, S, n, d] of the S positions from step.positions
        and the tokens after them [B, S] -> logits [B, S, vocab] for the tokens two ahead (the MTP layer's window
        rows written as the main layers' are, through `step.undo` too)."""
        ctx = self._paged_context(step, next_ids.shape[1])
        return self._mtp_predict(streams, next_ids, ctx, step.layer(self.cfg.num_hidden_layers))

    def _paged_context(self, step: PagedDecode, n_tokens: int) -> StepContext:
        starts = step.positions
        if n_tokens == 1:
            return self._context(starts, None, starts.view(-1, 1))
        return self._context(starts, None, starts[:, None] + torch.arange(n_tokens, device=starts.device))

    def _mtp_predict(
        self,
        streams: torch.Tensor,
        next_ids: torch.Tensor,
        ctx: StepContext,
        states: BlockStates,
        last_only: bool = False,
    ) -> torch.Tensor:
        """MTP module 0 over its states (per sequence, or the paged pool's MTP layer): logits [B, S, vocab] of the
        tokens two ahead ([B, 1, vocab] of the last position with `last_only`)."""
        if not len(self.mtp):
            raise ValueError("this model was built without its MTP module (mtp=False)")
        block = self.mtp[0]
        assert isinstance(block, MTPBlock)
        hidden = block.predict(streams, self.embed(next_ids).to(self.dtype), next_ids, ctx, states)
        if last_only:
            hidden = hidden[:, -1:]
        return self.head_logits(hidden)

    def hidden_streams(self, input_ids: torch.Tensor, states: list[SequenceState]) -> torch.Tensor:
        """Run the decoder blocks: input_ids [B, S] -> residual streams [B, S, n, d] before the hyper head.

        Advances every state by S tokens."""
        if input_ids.dim() != 2 or input_ids.shape[0] != len(states):
            raise ValueError(f"input_ids must be [B, S] with B = len(states) = {len(states)}, got {input_ids.shape}")
        ctx = self.context([st.position for st in states], input_ids.shape[1])
        h = self.embed(input_ids).to(self.dtype)
        streams = h.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous()
        streams = run_blocks(self.blocks, streams, input_ids, ctx, lambda i: [st.layers[i] for st in states])
        for st in states:
            st.position += input_ids.shape[1]
        return streams

    def logits(self, streams: torch.Tensor) -> torch.Tensor:
        """Residual streams [..., n, d] -> logits [..., vocab] in fp32 (float64 for a float64 model)."""
        return self.head_logits(self.final_hidden(streams))

    def final_hidden(self, streams: torch.Tensor) -> torch.Tensor:
        """Residual streams [..., n, d] -> the head's input [..., d]: the hyper head's collapse, the final norm."""
        lead = streams.shape[:-2]
        return self.norm(self.hc_head(streams.reshape(-1, *streams.shape[-2:]))).view(*lead, -1)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input [..., d] -> logits [..., vocab] in fp32 (float64 for a float64 model)."""
        return self.head(hidden, out_dtype=torch.promote_types(hidden.dtype, torch.float32))

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
    def mtp_logits(
        self, streams: torch.Tensor, next_ids: torch.Tensor, states: list[SequenceState], last_only: bool = False
    ) -> torch.Tensor:
        """MTP module 0: streams [B, S, n, d] of positions t (from `hidden_streams`) and the tokens at t+1
        [B, S] -> logits [B, S, vocab] for the tokens at t+2 ([B, 1, vocab] of the last position with `last_only`:
        the engine needs only the newest draft, and the head over a long prefill chunk's S positions would be
        S x vocab floats). Advances each state's `mtp_position` by S; call it for every position in order, like the
        main model."""
        ctx = self.context([st.mtp_position for st in states], next_ids.shape[1])
        logits = self._mtp_predict(streams, next_ids, ctx, [st.mtp_layers[0] for st in states], last_only)
        for st in states:
            st.mtp_position += next_ids.shape[1]
        return logits

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A fresh sequence per row: input_ids [B, T] -> logits [B, T, vocab] (fp32)."""
        return self.prefill(input_ids, [self.new_state() for _ in range(input_ids.shape[0])])
