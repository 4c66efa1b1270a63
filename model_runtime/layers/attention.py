"""Shared-K=V attention of one DeepSeek-V4 layer: sliding window, plus CSA (indexer top-k of compressed
entries) or HCA (all visible compressed entries), one softmax with a per-head sink, grouped output projection.

Two paths. Over per-sequence `LayerState`s (prefill, and any step of S tokens): a batch of sequences, each with
its own start position, all advancing by S tokens; key buffer of row b: [window ring (W) | this call's K=V (S) |
compressed entries (E_b, padded)], and each query attends to the indices `_window_indices` and the compressed
selection give into that buffer. Over a `PagedLayerView` (the engine's decode step, S = 1, or an MTP
verification step, S = 2, its tokens in order): the window ring, the compressor states and the entry stores of the
paged pool are written and read in place by batched ops and the paged kernel ops, with no per-row work and nothing
that grows with the context but the indexer's scoring pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.compressor import Compressor
from dsv4.model_runtime.layers.indexer import Indexer
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.layers.ops_module import OpsModule
from dsv4.model_runtime.layers.rope import RopeTable
from dsv4.model_runtime.qat import q4_hadamard, q8_nope
from dsv4.model_runtime.state import LayerState, PagedLayerView, PagedUndo


@dataclass
class StepContext:
    """What every layer of one forward call shares: positions and RoPE of the S new tokens of each row."""

    starts: torch.Tensor  # [B] int64, position of each row's first new token
    start_list: list[int] | None  # the same, as Python ints (per-sequence states only; None in a paged step)
    positions: torch.Tensor  # [B, S] int64
    rope_main: RopeTable  # SWA layers: θ = rope_theta, no YaRN
    rope_compress: RopeTable  # CSA/HCA layers: θ = compress_rope_theta with YaRN
    cos_sin: dict[bool, tuple[torch.Tensor, torch.Tensor]]  # compressed? -> cos, sin [B, S, rd/2]
    qat: bool


class Attention(OpsModule):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, c, h = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        self.n_heads, self.head_dim, self.rope_dim = h, c, cfg.qk_rope_head_dim
        self.window, self.groups, self.eps = cfg.sliding_window, cfg.o_groups, cfg.rms_norm_eps
        self.ratio = cfg.ratio(layer)
        self.wq_a = Linear(d, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * c)
        self.wkv = Linear(d, c)
        self.kv_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.wo_a = Linear(h * c // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)  # grouped
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d)
        self.attn_sink = nn.Parameter(torch.zeros(h))
        self.compressor = (
            Compressor(d, c, self.ratio, overlap=cfg.is_csa(layer), eps=cfg.rms_norm_eps) if self.ratio else None
        )
        self.indexer = Indexer(cfg, self.ratio) if cfg.is_csa(layer) else None

    def forward(self, x: torch.Tensor, ctx: StepContext, states: list[LayerState] | PagedLayerView) -> torch.Tensor:
        """x [B, S, d] -> [B, S, d]; updates each row's state (or the paged pool) with the S new tokens."""
        b, s, _ = x.shape
        compressed = self.compressor is not None
        cos, sin = ctx.cos_sin[compressed]
        qr = self.q_norm(self.wq_a(x))  # [B, S, q_lora]
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        # fused norm + RoPE (one kernel; in bf16 it skips the rounding between them)
        q = self.ops.rms_norm_rope(q, None, self.eps, cos, sin)  # unweighted per-head RMS norm
        kv = self.ops.rms_norm_rope(self.wkv(x), self.kv_norm.weight, self.kv_norm.eps, cos, sin)  # [B, S, c], K = V
        if ctx.qat:
            kv = q8_nope(kv, self.rope_dim)
        if isinstance(states, PagedLayerView):
            o = self._attend_paged(x, qr, q, kv, ctx, states)
            return self._output(o, cos, sin)

        if compressed:
            self._update_compressed(x, ctx, states)
        n_entries = max((st.n_entries for st in states), default=0)
        buffer = torch.cat([torch.stack([st.window for st in states]), kv, self._entries(states, n_entries)], 1)
        idx = self._window_indices(ctx)
        if self.indexer is not None:
            selected = self._select(x, qr, cos, sin, ctx, states, n_entries)
            idx = torch.cat([idx, torch.where(selected >= 0, selected + self.window + s, -1)], dim=-1)
        elif compressed:
            entry = torch.arange(n_entries, device=x.device)
            visible = (ctx.positions + 1) // self.ratio  # [B, S]
            idx = torch.cat([idx, torch.where(entry < visible[..., None], entry + self.window + s, -1)], dim=-1)

        o = self.ops.sparse_attention(q, buffer, idx, self.attn_sink, self.head_dim**-0.5)  # [B, S, H, c]
        out = self._output(o, cos, sin)
        self._write_window(kv, ctx, states)
        return out

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output o [B, S, H, c] -> [B, S, d]: inverse RoPE, grouped low-rank output projection."""
        b, s = o.shape[:2]
        o = self.ops.rope(o, cos, sin, inverse=True)
        grouped = self.wo_a.grouped(o.reshape(b * s, self.groups, -1))  # heads grouped contiguously: [B*S, G, o_lora]
        return self.wo_b(grouped.view(b, s, -1))

    def _attend_paged(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        q: torch.Tensor,
        kv: torch.Tensor,
        ctx: StepContext,
        layer: PagedLayerView,
    ) -> torch.Tensor:
        """S tokens per row over the paged pool, one after the other (S = 1 in a decode step, 2 in an MTP
        verification): store each token's K=V (window ring, compressed entries) and attend to the window and the
        selected entries in place. The projections ran for all S tokens at once; only these writes and reads are
        ordered, so token k sees the writes of tokens < k and none of later ones. Returns o [B, S, H, c]."""
        step, store = layer.step, layer.storage
        s = x.shape[1]
        proj = self.compressor.project(x, ctx.positions) if self.compressor is not None else None
        iproj = self.indexer.compressor.project(x, ctx.positions) if self.indexer is not None else None
        index_q = None
        if self.indexer is not None:
            cos, sin = ctx.cos_sin[True]
            index_q = self.indexer.queries(x, qr, cos, sin, ctx.qat)
        out = []
        for k in range(s):
            positions = step.positions + k
            undo = step.undo if k else None  # tokens after the first are tentative
            slot_row = positions % self.window
            if undo is not None:
                undo.save(store.window, slot_row)
            # The token's K=V goes into the ring first: position t replaces t - W, which has left the window.
            store.window.index_put_((step.slots, slot_row), kv[:, k].to(store.window.dtype))
            entry_idx = None
            if self.compressor is not None:
                assert store.entries is not None and proj is not None
                self._update_compressed_paged(x.dtype, proj, iproj, k, positions, ctx, layer, undo)
                visible = (positions + 1) // self.ratio
                if index_q is not None:
                    assert self.indexer is not None and store.index_keys is not None
                    q_i, w_i = index_q
                    entry_idx = self.indexer.select_paged(
                        q_i[:, k], w_i[:, k], store.index_keys.rows, step.block_tables, visible, ctx.qat
                    )
                else:  # HCA: every visible entry
                    n = step.block_tables.shape[1] * store.entries.rows.rows_per_block
                    entry = torch.arange(n, device=x.device)
                    entry_idx = torch.where(entry < visible[:, None], entry, -1)
            entries = store.entries.rows if store.entries is not None else None
            o = self.ops.paged_sparse_attention(
                q[:, k],
                store.window,
                step.slots,
                positions,
                entries,
                step.block_tables,
                entry_idx,
                self.attn_sink,
                self.head_dim**-0.5,
            )
            out.append(o[:, None])
        return out[0] if s == 1 else torch.cat(out, dim=1)

    def _update_compressed_paged(
        self,
        dtype: torch.dtype,
        proj: tuple[torch.Tensor, torch.Tensor],
        iproj: tuple[torch.Tensor, torch.Tensor] | None,
        k: int,
        positions: torch.Tensor,
        ctx: StepContext,
        layer: PagedLayerView,
        undo: PagedUndo | None,
    ) -> None:
        """Fold token k of every row (at `positions`; `proj`, `iproj`: the compressor projections of all the step's
        tokens) into its compressor states; rows whose token completes a block store the block's entry (and CSA
        indexer key, in `dtype`) in their blocks, the others write the stores' sink row."""
        assert self.compressor is not None
        step, store = layer.step, layer.storage
        assert store.entries is not None
        m = self.ratio
        block = positions // m
        if undo is not None and self.compressor.overlap:  # completing a block moves a CSA state's rows [0, m)
            for name in ("comp_kv", "comp_score", "icomp_kv", "icomp_score"):
                if name in store.comp:
                    undo.save(store.comp[name][:, :m])
        a, z = proj
        pooled, complete = self.compressor.pool_step(
            store.comp["comp_kv"], store.comp["comp_score"], a[:, k], z[:, k], step.slots, positions, store.sink_slot
        )
        sim: Callable[[torch.Tensor], torch.Tensor] | None = (lambda e: q8_nope(e, self.rope_dim)) if ctx.qat else None
        entries = self.compressor.finish(pooled, block, ctx.rope_compress, sim, dtype)
        target = store.entries.rows.flat_rows(step.block_tables, block[:, None])[:, 0]
        target = torch.where(complete, target, store.entries.sink_row)
        store.entries.write(target, entries)
        if self.indexer is not None:
            assert store.index_keys is not None and iproj is not None
            ia, iz = iproj
            ipooled, _ = self.indexer.compressor.pool_step(
                store.comp["icomp_kv"], store.comp["icomp_score"], ia[:, k], iz[:, k], step.slots, positions,
                store.sink_slot,
            )  # fmt: skip
            keys = self.indexer.compressor.finish(
                ipooled, block, ctx.rope_compress, q4_hadamard if ctx.qat else None, dtype
            )
            store.index_keys.write(torch.where(complete, target, store.index_keys.sink_row), keys)

    def _window_indices(self, ctx: StepContext) -> torch.Tensor:
        """[B, S, W] buffer indices of the keys at positions t-W+1..t (-1 before position 0)."""
        w = self.window
        p = ctx.positions[..., None] - w + 1 + torch.arange(w, device=ctx.positions.device)  # [B, S, W]
        start = ctx.starts.view(-1, 1, 1)
        idx = torch.where(p >= start, w + p - start, p % w)  # this call's K=V, else the ring slot
        return torch.where(p >= 0, idx, -1)

    def _entries(self, states: list[LayerState], n: int) -> torch.Tensor:
        """[B, n, c]: each row's compressed entries, zero-padded to n."""
        if n == 0:
            return states[0].window.new_zeros(len(states), 0, self.head_dim)
        return pad_sequence([st.valid_entries() for st in states], batch_first=True)

    def _update_compressed(self, x: torch.Tensor, ctx: StepContext, states: list[LayerState]) -> None:
        assert self.compressor is not None
        main_sim: Callable[[torch.Tensor], torch.Tensor] | None = (
            (lambda e: q8_nope(e, self.rope_dim)) if ctx.qat else None
        )
        a, z = self.compressor.project(x, ctx.positions)
        if self.indexer is not None:
            ia, iz = self.indexer.compressor.project(x, ctx.positions)
        assert ctx.start_list is not None
        for row, st in enumerate(states):
            start = ctx.start_list[row]
            first_block = start // self.ratio
            pooled = self.compressor.pool(st.comp_kv, st.comp_score, a[row], z[row], start)
            ipooled = None
            if self.indexer is not None:
                ipooled = self.indexer.compressor.pool(st.icomp_kv, st.icomp_score, ia[row], iz[row], start)
            if pooled is None:
                continue
            blocks = torch.arange(pooled.shape[0], device=x.device) + first_block
            entries = self.compressor.finish(pooled, blocks, ctx.rope_compress, main_sim, x.dtype)
            keys = None
            if self.indexer is not None and ipooled is not None:
                keys = self.indexer.compressor.finish(
                    ipooled, blocks, ctx.rope_compress, q4_hadamard if ctx.qat else None, x.dtype
                )
            st.append_entries(entries, keys)

    def _select(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: StepContext,
        states: list[LayerState],
        n_entries: int,
    ) -> torch.Tensor:
        assert self.indexer is not None
        q, weights = self.indexer.queries(x, qr, cos, sin, ctx.qat)
        keys = (
            pad_sequence([st.valid_index_keys() for st in states], batch_first=True)
            if n_entries
            else q.new_zeros(len(states), 0, self.indexer.head_dim)
        )
        visible = (ctx.positions + 1) // self.ratio
        return self.indexer.select(q, weights, keys, visible, ctx.qat)

    def _write_window(self, kv: torch.Tensor, ctx: StepContext, states: list[LayerState]) -> None:
        assert ctx.start_list is not None
        s, w = kv.shape[1], self.window
        if s == 1:  # decode: one ring slot per row
            for row, st in enumerate(states):
                st.window[ctx.start_list[row] % w] = kv[row, 0]
            return
        n = min(s, w)
        offsets = torch.arange(s - n, s, device=kv.device)
        for row, st in enumerate(states):
            st.window[(offsets + ctx.start_list[row]) % w] = kv[row, s - n :]
