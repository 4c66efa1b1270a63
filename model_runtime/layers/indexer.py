"""The lightning indexer of CSA layers: picks, per query, the top-k compressed entries to attend to.

q^I = wq_b(qr) per head [Hi, ic], rotated at the query position (compressed-layer table); keys are the
entries of the indexer's own overlapping compressor (dim ic). score_{t,i} = sum_h w_{t,h} ReLU(q^I_{t,h} . K_i)
with w = weights_proj(x) * ic^-1/2 * Hi^-1/2, over visible entries i < (t+1) // m. With QAT: Hadamard + FP4 on
q and keys, and the scoring in bf16 (the official numerics).
"""

from __future__ import annotations

import torch

from dsv4.kernels.paged import PagedRows
from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.compressor import Compressor
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.ops_module import OpsModule
from dsv4.model_runtime.qat import q4_hadamard


class Indexer(OpsModule):
    def __init__(self, cfg: ModelConfig, ratio: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, ratio, overlap=True, eps=cfg.rms_norm_eps)
        self.weight_scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qat: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d], qr [B, S, q_lora] -> (q [B, S, Hi, ic], weights [B, S, Hi])."""
        b, s, _ = x.shape
        q = self.ops.rope(self.wq_b(qr).view(b, s, self.n_heads, self.head_dim), cos, sin)
        weights = self.weights_proj(x) * self.weight_scale
        if qat:
            q = q4_hadamard(q)
        return q, weights

    def select(
        self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, qat: bool
    ) -> torch.Tensor:
        """keys [B, E, ic] (padded), visible [B, S] -> selected entry indices [B, S, k] (-1 = none)."""
        if qat:  # the official scoring runs on bf16 tensors
            q, weights, keys = q.bfloat16(), weights.bfloat16(), keys.bfloat16()
        return self.ops.indexer_topk(q, weights, keys, visible, self.topk)

    def select_paged(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: PagedRows,
        block_tables: torch.Tensor,
        visible: torch.Tensor,
        qat: bool,
    ) -> torch.Tensor:
        """One query per row over the paged keys: q [B, Hi, ic], weights [B, Hi], visible [B] -> [B, k] (-1 = none)."""
        if qat:  # the official scoring runs on bf16 tensors
            q, weights = q.bfloat16(), weights.bfloat16()
        return self.ops.paged_indexer_topk(q, weights, keys, block_tables, visible, self.topk)
