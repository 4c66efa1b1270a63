"""Mixture of experts: sqrtsoftplus router (learned top-k with selection bias, or hash table), routed experts
through a grouped matmul, and one shared expert; clamped SwiGLU in both (oracle_notes §5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.ops_module import OpsModule


class Gate(OpsModule):
    def __init__(self, cfg: ModelConfig, hashed: bool) -> None:
        super().__init__()
        self.topk, self.route_scale, self.hashed = cfg.num_experts_per_tok, cfg.routed_scaling_factor, hashed
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.bias = None if hashed else nn.Parameter(torch.zeros(cfg.n_routed_experts))
        self.tid2eid: torch.Tensor | None
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.long) if hashed else None)

    def forward(self, u: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [N, d], token_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        acc = torch.promote_types(u.dtype, torch.float32)
        logits = F.linear(u.to(acc), self.weight.to(acc))
        hash_idx = self.tid2eid[token_ids] if self.tid2eid is not None else None
        return self.ops.route(logits, self.topk, self.route_scale, bias=self.bias, hash_idx=hash_idx)


class SharedExpert(OpsModule):
    def __init__(self, dim: int, inter: int, limit: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.limit = limit

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.swiglu(self.w1(u), self.w3(u), self.limit))


class MoE(OpsModule):
    def __init__(self, cfg: ModelConfig, hashed: bool) -> None:
        super().__init__()
        e, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inter, self.limit = e, inter, cfg.swiglu_limit
        self.gate = Gate(cfg, hashed)
        self.w13 = nn.Parameter(torch.zeros(e, 2 * inter, d))  # experts' w1 and w3 stacked, [out, in]
        self.w2 = nn.Parameter(torch.zeros(e, d, inter))
        self.shared_experts = SharedExpert(d, inter, cfg.swiglu_limit) if cfg.n_shared_experts else None

    def forward(self, u: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """u [N, d], token_ids [N] -> [N, d] (sum over the k routed experts and the shared expert, fp32)."""
        weights, idx = self.gate(u, token_ids)  # [N, k]
        k = idx.shape[1]
        # Sorted segments: (token, slot) pairs grouped by expert, the segment ends found on the device (bincount
        # sizes its output from the data, a host sync on a GPU).
        experts, order = idx.flatten().sort(stable=True)
        token = order // k
        bounds = torch.arange(self.n_experts, device=u.device)
        ends = torch.searchsorted(experts, bounds, right=True).to(torch.int32)
        h = self.ops.grouped_matmul(u[token], self.w13, ends)  # [N*k, 2I]
        act = self.ops.swiglu(h[:, : self.inter], h[:, self.inter :], self.limit, weights.flatten()[order])
        out = self.ops.grouped_matmul(act, self.w2, ends)  # [N*k, d]
        acc = torch.promote_types(u.dtype, torch.float32)
        # Back to (token, slot) order and summed over the slots: the same order for every batch (an atomic
        # index_add on a GPU would add a token's experts in a different order from run to run).
        y = out.new_empty(out.shape).index_copy_(0, order, out).view(-1, k, out.shape[-1]).to(acc).sum(1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u).to(acc)
        return y.to(u.dtype)
