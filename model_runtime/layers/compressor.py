"""The token compressor of CSA (overlapping, m = 4) and HCA (non-overlapping, any other m) layers.

Per token t: a_t = W_kv x_t, z_t = W_gate x_t + ape[t mod m] (fp32, width coff*c). Entry i pools block i:
HCA: softmax over the block's m tokens per channel. CSA: over 2m slots, the previous block's A halves
(a[:c], z[:c]) and the current block's B halves (a[c:], z[c:]). Each entry is then RMS-normed, rotated at
position i*m, and (QAT) round-tripped by the caller-supplied simulation. An entry exists only once its block is
complete; incomplete blocks live in the per-sequence compressor state (see dsv4.model_runtime.state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.norm import RMSNorm
from dsv4.model_runtime.layers.ops_module import OpsModule
from dsv4.model_runtime.layers.rope import RopeTable


class Compressor(OpsModule):
    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = Linear(dim, width)
        self.wgate = Linear(dim, width)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d], positions [B, S] -> (a, z) [B, S, coff*c] in >= fp32 (z includes ape of the slot)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        a = self.wkv(x, out_dtype=acc)
        z = self.wgate(x, out_dtype=acc) + self.ape.to(acc)[positions % self.ratio]
        return a, z

    def pool(
        self, state_kv: torch.Tensor, state_score: torch.Tensor, a: torch.Tensor, z: torch.Tensor, start: int
    ) -> torch.Tensor | None:
        """One sequence: fold S new tokens (a, z [S, coff*c], first at position `start`) into the state in place.

        Returns the pooled entries [nb, c] of the nb blocks these tokens complete, or None when they complete none.
        """
        m, c = self.ratio, self.head_dim
        r, s = start % m, a.shape[0]
        off = m if self.overlap else 0  # CSA keeps the previous block in slots [0, m)
        if r + s < m:  # no block completes (most decode steps): just fill the current block's slots
            state_kv[off + r : off + r + s], state_score[off + r : off + r + s] = a, z
            return None
        kv = torch.cat([state_kv[off : off + r], a])  # [r + S, coff*c], block-aligned
        sc = torch.cat([state_score[off : off + r], z])
        nb, rem = divmod(kv.shape[0], m)
        blocks_kv, blocks_sc = kv[: nb * m].view(nb, m, kv.shape[-1]), sc[: nb * m].view(nb, m, sc.shape[-1])
        if self.overlap:
            prev_kv = torch.cat([state_kv[None, :m], blocks_kv[:-1]])  # [nb, m, 2c]: block i-1 of block i
            prev_sc = torch.cat([state_score[None, :m], blocks_sc[:-1]])
            slots_kv = torch.cat([prev_kv[..., :c], blocks_kv[..., c:]], dim=1)  # [nb, 2m, c]
            slots_sc = torch.cat([prev_sc[..., :c], blocks_sc[..., c:]], dim=1)
            state_kv[:m], state_score[:m] = blocks_kv[-1], blocks_sc[-1]
        else:
            slots_kv, slots_sc = blocks_kv, blocks_sc
        state_kv[off:], state_score[off:] = 0.0, float("-inf")
        state_kv[off : off + rem], state_score[off : off + rem] = kv[nb * m :], sc[nb * m :]
        return self.ops.compress_pool(slots_kv, slots_sc)

    def pool_step(
        self,
        state_kv: torch.Tensor,
        state_score: torch.Tensor,
        a: torch.Tensor,
        z: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        sink_slot: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of decode tokens: fold a, z [B, coff*c] of the token at positions [B] into the states of their
        pool slots (state_kv, state_score [slots, coff*m, coff*c]) in place.

        Returns (pooled [B, c], complete [B]): pooled is the entry of the row's block where the token completes it
        (complete), zeros elsewhere. The pooling reads the states in place and only the complete rows' (a block
        completes once every m steps: an HCA state of m = 128 is read once, not 128 times); the step is the same
        ops for any batch.
        """
        m = self.ratio
        row = positions % m + (m if self.overlap else 0)
        # index_put_ rather than item assignment, whose Python path adds views when B = 1: the same ops for any B
        state_kv.index_put_((slots, row), a.to(state_kv.dtype))
        state_score.index_put_((slots, row), z.to(state_score.dtype))
        complete = (positions + 1) % m == 0
        pooled = self.ops.compress_pool_slots(state_kv, state_score, slots, complete, self.overlap)
        if self.overlap:
            # A completed block becomes the previous one (slots [0, m)); other rows write the sink slot. Rows
            # [m, 2m) are not cleared: the next block's tokens overwrite all of them before its entry is pooled.
            keep = torch.where(complete, slots, sink_slot)
            state_kv[:, :m].index_put_((keep,), state_kv[slots, m:])
            state_score[:, :m].index_put_((keep,), state_score[slots, m:])
        return pooled, complete

    def finish(
        self,
        pooled: torch.Tensor,
        blocks: torch.Tensor,
        rope: RopeTable,
        simulate: Callable[[torch.Tensor], torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """pooled [N, c] fp32 of blocks [N] (int64) -> entries [N, c]: norm, RoPE at block*m, simulation."""
        entries = self.norm(pooled.to(dtype))
        cos, sin = rope((blocks * self.ratio)[:, None])
        entries = self.ops.rope(entries[:, None], cos, sin)[:, 0]
        return simulate(entries) if simulate is not None else entries
