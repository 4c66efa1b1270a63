"""Mixture of experts: sqrtsoftplus router (learned top-k with selection bias, or hash table), routed experts
through a grouped matmul, and one shared expert; clamped SwiGLU in both (oracle_notes §5).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.kernels.ops import Ops
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


def routed_experts(
    ops: Ops,
    u: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    experts: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    limit: float,
    first: int = 0,
) -> torch.Tensor:
    """Each token's sum over its k routed experts (accumulation dtype), for the experts [first, first + E) whose
    stacked weights `experts` = (w13, w13_scale, w2, w2_scale) hold (E = w13.shape[0]); the (token, expert) pairs
    of other experts add exactly 0. u [N, d]; weights [N, k] fp32 and idx [N, k] from the gate.

    Sorted segments, with no host sync: the pairs are sorted by local expert (others after them, as "no expert")
    and each segment's end found on the device (bincount or nonzero size their outputs from the data, a host sync
    on a GPU). Under expert parallelism the grouped matmuls give the pairs past the last end zero rows; one rank
    therefore runs all N*k pairs' rows through its gathers but only its own pairs through its experts."""
    w13, w13_scale, w2, w2_scale = experts
    n_local, k = w13.shape[0], idx.shape[1]
    inter = w13.shape[1] // 2
    local = idx.flatten() - first
    key = torch.where((local >= 0) & (local < n_local), local, n_local)
    keys, order = key.sort(stable=True)
    token = order // k
    ends = torch.searchsorted(keys, torch.arange(n_local, device=u.device), right=True).to(torch.int32)
    h = expert_matmul(ops, u[token], w13, w13_scale, ends)  # [N*k, 2I]
    act = ops.swiglu(h[:, :inter], h[:, inter:], limit, weights.flatten()[order])
    out = expert_matmul(ops, act, w2, w2_scale, ends)  # [N*k, d]
    # Back to (token, slot) order and summed over the slots: the same order for every batch (an atomic
    # index_add on a GPU would add a token's experts in a different order from run to run).
    acc = torch.promote_types(u.dtype, torch.float32)
    return out.new_empty(out.shape).index_copy_(0, order, out).view(-1, k, out.shape[-1]).to(acc).sum(1)


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
        experts = (self.w13, self.w13_scale, self.w2, self.w2_scale)
        y = routed_experts(self.ops, u, weights, idx, experts, self.limit)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u).to(y.dtype)
        return y.to(u.dtype)
