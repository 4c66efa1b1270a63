"""Mixture of experts: sqrtsoftplus router (learned top-k with selection bias, or hash table), routed experts
through a grouped matmul, and one shared expert; clamped SwiGLU in both (oracle_notes §5).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.linear import Linear, expert_matmul
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
        logits = self.ops.linear(u, self.weight, None, torch.promote_types(u.dtype, torch.float32))
        hash_idx = self.tid2eid[token_ids] if self.tid2eid is not None else None
        return self.ops.route(logits, self.topk, self.route_scale, bias=self.bias, hash_idx=hash_idx)


class SharedExpert(OpsModule):
    def __init__(self, dim: int, inter: int, limit: float) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter)
        self.w2 = Linear(inter, dim)
        self.w3 = Linear(dim, inter)
        self.limit = limit

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.swiglu(self.w1(u), self.w3(u), self.limit))


class MoE(OpsModule):
    def __init__(self, cfg: ModelConfig, hashed: bool) -> None:
        super().__init__()
        e, d, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.inter, self.limit = e, inter, cfg.swiglu_limit
        self.gate = Gate(cfg, hashed)
        # experts' w1 and w3 stacked, [out, in]; the loader stores them as the checkpoint does (MXFP4 packed with
        # E8M0 scales [E, out, in/32] in released checkpoints)
        self.w13 = nn.Parameter(torch.empty(e, 2 * inter, d), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, d, inter), requires_grad=False)
        self.w13_scale: torch.Tensor | None
        self.w2_scale: torch.Tensor | None
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)
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
        h = expert_matmul(self.ops, u[token], self.w13, self.w13_scale, ends)  # [N*k, 2I]
        act = self.ops.swiglu(h[:, : self.inter], h[:, self.inter :], self.limit, weights.flatten()[order])
        out = expert_matmul(self.ops, act, self.w2, self.w2_scale, ends)  # [N*k, d]
        acc = torch.promote_types(u.dtype, torch.float32)
        # Back to (token, slot) order and summed over the slots: the same order for every batch (an atomic
        # index_add on a GPU would add a token's experts in a different order from run to run).
        y = out.new_empty(out.shape).index_copy_(0, order, out).view(-1, k, out.shape[-1]).to(acc).sum(1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u).to(acc)
        return y.to(u.dtype)
