"""Turn a DeepSeek-V4 model (built on the meta device) into one rank's shard of a layout, before its weights are
loaded: the modules get this rank's shapes (`placement` says which piece of every tensor a rank holds) and the
collectives that make the shards compute what the whole model computes.

- Vocabulary-parallel `embed` (rows [r*V/tp, ...): ids outside the range give zero, summed over the ranks) and
  `head` (this rank's logits, gathered over the ranks into the full vocabulary).
- Tensor-parallel attention: this rank's heads of wq_b, attn_sink and the output groups they feed (wo_a rows,
  wo_b columns); the unchanged Attention.forward runs on them and a forward hook sums the partial outputs.
  K=V, compressor and indexer stay replicated, so every rank holds the whole K=V cache.
- MoE: expert parallel (experts [r*E/ep, ...) whole) or tensor parallel (every expert's intermediate rows
  [r*I/tp, ...)); every rank routes every token (activations are replicated), computes the (token, slot)
  pairs it holds, and the outputs are summed over the ranks (the all-reduce form of dispatch/combine). The
  shared expert is split over the tensor ranks, or held whole by tensor rank 0 when its rows do not split into
  whole FP8 blocks; under expert parallelism only group 0 holds it (`placement`).
- Data-parallel attention (dp > 1, `data_parallel.py`): the collectives above that serve attention, embedding and
  head run inside this rank's tensor-parallel group, on its group's rows; under expert parallelism the MoE first
  gathers the tokens of every group, sums over the world and keeps its group's rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.layers.attention import Attention
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.moe import MoE, SharedExpert, routed_experts
from dsv4.model_runtime.layers.ops_module import OpsModule
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.data_parallel import DataParallel
from dsv4.model_runtime.parallel.group import all_reduce_sum
from dsv4.model_runtime.placement import Layout, PlacementError, holds_shared_expert, splits_shared_expert


class _ReduceOutput:
    """A forward hook summing a module's partial output over a tensor-parallel group (None: the world)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def __call__(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(output, self.group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [first, first + n) of the embedding table; the lookup is summed over the tensor-parallel group."""

    def __init__(self, vocab: int, dim: int, layout: Layout, rank: int, group: dist.ProcessGroup | None) -> None:
        n = vocab // layout.tp
        super().__init__(n, dim)
        self.first, self.n, self.group = layout.tp_rank(rank) * n, n, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        inside = (local >= 0) & (local < self.n)
        rows = F.embedding(local.clamp(0, self.n - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        return all_reduce_sum(rows, self.group)


class VocabParallelHead(Linear):
    """This rank's vocabulary rows of the head; the logits of the tensor-parallel group are gathered in rank
    order."""

    def __init__(self, dim: int, vocab: int, layout: Layout, group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, vocab // layout.tp)
        self.group = group

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        local = super().forward(x, out_dtype).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


def shard_attention(attn: Attention, layout: Layout, group: dist.ProcessGroup | None = None) -> None:
    """Give `attn` this rank's heads (placeholders; the loader fills them); its output is summed over the
    tensor-parallel group (None: the world)."""
    tp = layout.tp
    heads, groups = attn.n_heads // tp, attn.groups // tp
    c = attn.head_dim
    o_lora = attn.wo_a.out_features // attn.groups
    attn.wq_b = Linear(attn.wq_b.in_features, heads * c)
    attn.wo_a = Linear(attn.wo_a.in_features, groups * o_lora)
    attn.wo_b = Linear(groups * o_lora, attn.wo_b.out_features)
    attn.attn_sink = nn.Parameter(torch.empty(heads), requires_grad=False)
    attn.n_heads, attn.groups = heads, groups
    attn.register_forward_hook(_ReduceOutput(group))


class ParallelMoE(OpsModule):
    """The MoE of one rank: experts [first, first + n_local) with `inter` intermediate rows each, plus its part of
    the shared expert (or none); the output is summed over the ranks. Under data-parallel attention (`dp`) it
    runs over every group's tokens when experts are split over the world, else inside this rank's group."""

    def __init__(
        self, moe: MoE, cfg: ModelConfig, layout: Layout, rank: int, shared_format: str, dp: DataParallel | None
    ) -> None:
        super().__init__()
        self.dp = dp
        if layout.ep > 1:
            self.first, self.n_local = rank * moe.n_experts // layout.ep, moe.n_experts // layout.ep
            self.inter = moe.inter
        else:
            self.first, self.n_local, self.inter = 0, moe.n_experts, moe.inter // layout.tp
        self.limit, self.gate = moe.limit, moe.gate
        shared = moe.shared_experts
        self.shared_experts: SharedExpert | None = None
        if shared is not None and holds_shared_expert(cfg, shared_format, layout, rank):
            parts = layout.tp if splits_shared_expert(cfg, shared_format, layout) else 1
            self.shared_experts = SharedExpert(shared.w1.in_features, shared.w1.out_features // parts, moe.limit)
        d = moe.w2.shape[1]
        self.w13 = nn.Parameter(torch.empty(self.n_local, 2 * self.inter, d), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.n_local, d, self.inter), requires_grad=False)
        self.w13_scale: torch.Tensor | None
        self.w2_scale: torch.Tensor | None
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)

    def forward(self, u: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """u [N, d], token_ids [N] -> [N, d]: this rank's experts and shared-expert part, summed over the ranks."""
        dp = self.dp
        if dp is None:
            return all_reduce_sum(self._partial(u, token_ids)).to(u.dtype)
        if not dp.gathers_moe:
            return all_reduce_sum(self._partial(u, token_ids), dp.tp_group).to(u.dtype)
        y = all_reduce_sum(self._partial(dp.gather(u), dp.gather(token_ids)))
        return dp.mine(y).to(u.dtype)

    def _partial(self, u: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """This rank's part of the MoE output of u [N, d] (accumulation dtype), before the sum over the ranks."""
        weights, idx = self.gate(u, token_ids)  # [N, k], all experts
        experts = (self.w13, self.w13_scale, self.w2, self.w2_scale)
        y = routed_experts(self.ops, u, weights, idx, experts, self.limit, self.first)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u).to(y.dtype)
        return y


def shard_model(
    model: DeepseekV4,
    layout: Layout,
    rank: int,
    format_of: Callable[[str], str],
    data_parallel: DataParallel | None = None,
) -> None:
    """Turn a meta-device DeepseekV4 into rank `rank`'s shard of `layout` in place (before its weights load);
    `format_of(name)` is the stored format of a checkpoint tensor (it decides how the shared expert splits). A
    layout of several data-parallel groups needs their process groups (`DataParallel.create`)."""
    if layout.world == 1:
        return
    if layout.dp > 1 and data_parallel is None:
        raise PlacementError(
            f"layout {layout.describe()}: data-parallel attention needs its process groups (DataParallel.create)"
        )
    tp_group = data_parallel.tp_group if data_parallel is not None else None
    cfg = model.cfg
    if layout.tp > 1:
        model.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, layout, rank, tp_group)
        model.head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size, layout, tp_group)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    blocks += [(f"mtp.{i}", b) for i, b in enumerate(model.mtp)]
    for prefix, block in blocks:
        assert isinstance(block.attn, Attention) and isinstance(block.ffn, MoE)
        if layout.tp > 1:
            shard_attention(block.attn, layout, tp_group)
        if layout.tp > 1 or layout.ep > 1:
            shared = f"{prefix}.ffn.shared_experts.w1.weight"
            fmt = format_of(shared) if cfg.n_shared_experts else "bf16"
            block.ffn = ParallelMoE(block.ffn, cfg, layout, rank, fmt, data_parallel)


def idle_pass(model: DeepseekV4, data_parallel: DataParallel, mtp: bool = False) -> None:
    """Take part, with no rows, in the exchanges of a model call that only other data-parallel groups have rows in:
    the MoE of every layer (`mtp`: of the MTP block) when it runs over every group's tokens (nothing otherwise)."""
    if not data_parallel.gathers_moe:
        return
    d = model.cfg.hidden_size
    u = torch.zeros(0, d, dtype=model.dtype, device=model.device)
    ids = torch.zeros(0, dtype=torch.long, device=model.device)
    for block in model.mtp[:1] if mtp else model.layers:
        assert isinstance(block.ffn, ParallelMoE)
        block.ffn(u, ids)
