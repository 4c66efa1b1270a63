"""Turn a DeepSeek-V4 model's layers into this rank's shard, without editing the model's modules' code.

Tensor parallel attention: rank r keeps heads [r*H/tp, (r+1)*H/tp) of wq_b, attn_sink and the output groups
they feed (wo_a rows, wo_b columns; o_groups must split evenly), runs the unchanged Attention.forward on them,
and a forward hook sums the partial outputs over the ranks. K=V, compressor and indexer stay replicated.
Expert parallel MoE: rank r keeps experts [r*E/ep, ...); every rank routes every token (activations are
replicated), computes the (token, slot) pairs of its own experts, and the outputs are summed over the ranks
(the all-reduce form of dispatch/combine); rank 0 adds the shared expert.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model_runtime.layers.attention import Attention
from dsv4.model_runtime.layers.moe import MoE
from dsv4.model_runtime.layers.ops_module import OpsModule
from dsv4.model_runtime.parallel.group import ParallelConfig, all_reduce_sum


def _reduce_output(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(output)


def shard_attention(attn: Attention, pc: ParallelConfig) -> None:
    """Give `attn` (parameters not loaded yet) this rank's heads; its output is summed over the ranks."""
    if pc.tp == 1:
        return
    heads, groups = attn.n_heads // pc.tp, attn.groups // pc.tp
    if heads * pc.tp != attn.n_heads or groups * pc.tp != attn.groups:
        raise ValueError(f"tp={pc.tp} must divide heads {attn.n_heads} and o_groups {attn.groups}")
    c = attn.head_dim
    o_lora = attn.wo_a.out_features // attn.groups
    dev, dt = attn.wq_b.weight.device, attn.wq_b.weight.dtype
    attn.wq_b = nn.Linear(attn.wq_b.in_features, heads * c, bias=False, device=dev, dtype=dt)
    attn.wo_a = nn.Linear(attn.wo_a.in_features, groups * o_lora, bias=False, device=dev, dtype=dt)
    attn.wo_b = nn.Linear(groups * o_lora, attn.wo_b.out_features, bias=False, device=dev, dtype=dt)
    attn.attn_sink = nn.Parameter(torch.zeros(heads, device=dev, dtype=attn.attn_sink.dtype))
    attn.n_heads, attn.groups = heads, groups
    attn.register_forward_hook(_reduce_output)


class ExpertParallelMoE(OpsModule):
    """MoE with experts [first, first + n_local) of E on this rank; output summed over the ranks."""

    def __init__(self, moe: MoE, pc: ParallelConfig) -> None:
        super().__init__()
        self.first, stop = pc.span(moe.n_experts, pc.ep, "routed experts")
        self.n_local, self.inter, self.limit = stop - self.first, moe.inter, moe.limit
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts if pc.rank == 0 else None
        w13, w2 = moe.w13, moe.w2
        self.w13 = nn.Parameter(torch.zeros(self.n_local, *w13.shape[1:], device=w13.device, dtype=w13.dtype))
        self.w2 = nn.Parameter(torch.zeros(self.n_local, *w2.shape[1:], device=w2.device, dtype=w2.dtype))

    def forward(self, u: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """u [N, d], token_ids [N] -> [N, d]: this rank's experts plus (rank 0) the shared expert, summed."""
        weights, idx = self.gate(u, token_ids)  # [N, k], all experts
        k = idx.shape[1]
        local = idx.flatten() - self.first
        pairs = torch.nonzero((local >= 0) & (local < self.n_local)).flatten()  # (token, slot) pairs here
        order = local[pairs].argsort(stable=True)
        pairs = pairs[order]
        token = pairs // k
        ends = torch.bincount(local[pairs], minlength=self.n_local).cumsum(0).to(torch.int32)
        h = self.ops.grouped_matmul(u[token], self.w13, ends)
        act = self.ops.swiglu(h[:, : self.inter], h[:, self.inter :], self.limit, weights.flatten()[pairs])
        out = self.ops.grouped_matmul(act, self.w2, ends)
        acc = torch.promote_types(u.dtype, torch.float32)
        y = torch.zeros(u.shape, dtype=acc, device=u.device).index_add_(0, token, out.to(acc))
        if self.shared_experts is not None:
            y = y + self.shared_experts(u).to(acc)
        return all_reduce_sum(y).to(u.dtype)


def shard_model(model: nn.Module, pc: ParallelConfig) -> None:
    """Shard every decoder block of a DeepseekV4 in place (before its weights are loaded)."""
    for block in model.layers:  # type: ignore[union-attr]
        shard_attention(block.attn, pc)
        if pc.ep > 1:
            block.ffn = ExpertParallelMoE(block.ffn, pc)
