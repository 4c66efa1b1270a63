"""Adapters: our op contracts (dsv4.kernels.ops) translated onto torch_npu 2.14 ops. NOT RUN ON ASCEND HARDWARE.

Each adapter reshapes our canonical tensors into the layout the op documents (BSND, 4-D RoPE inputs, -1 padded
index lists with the valid entries first, cumulative group lists), calls the op through `npu()`, and maps the
result back. Ops without a fitting torch_npu op (router, SwiGLU with clamp, compressor pooling, hyper head,
sampling) run the PyTorch reference on the NPU tensors; kernels/CAPABILITIES.md lists which is which.
"""

from __future__ import annotations

import torch

from dsv4.kernels.ascend.namespace import npu
from dsv4.kernels.paged import PagedRows
from dsv4.kernels.reference import attention as ref_attention
from dsv4.kernels.reference import linear as ref_linear
from dsv4.kernels.reference import mhc as ref_mhc
from dsv4.kernels.reference import moe as ref_moe
from dsv4.kernels.reference import norm_rope as ref_norm_rope
from dsv4.kernels.reference import paged as ref_paged
from dsv4.kernels.reference import sampling as ref_sampling
from dsv4.kernels.reference.fused import post_then_pre
from dsv4.kernels.reference.quant_moe import dequant_fp8_experts, dequant_mxfp4_experts
from dsv4.kernels.registry import register

# Plain PyTorch on the NPU: torch_npu 2.14 has no op with these semantics (npu_swiglu has no clamp; the custom
# `compressor` fuses projection and cache insert; sampling has no fused top-k/top-p op worth the layout change;
# the quantized matmuls of the 2.14 schema take INT8/INT4 weights (npu_weight_quant_batchmatmul,
# npu_quant_matmul on Atlas A2/A3), FP8 only on Ascend 950, so an FP8 block-scaled `linear` is dequantized to the
# activation dtype and multiplied, every call).
for _op, _fn in (
    ("linear", ref_linear.linear),
    ("swiglu", ref_norm_rope.swiglu),
    ("filter_logits", ref_sampling.filter_logits),
    ("sample_tokens", ref_sampling.sample_tokens),
    ("sample_tokens_seeded", ref_sampling.sample_tokens_seeded),
    ("compress_pool", ref_attention.compress_pool),
    ("compress_pool_slots", ref_attention.compress_pool_slots),
    ("hc_head", ref_mhc.hc_head),
):
    register(_op, "ascend")(_fn)


@register("route", "ascend")
def route(
    logits: torch.Tensor,
    topk: int,
    route_scale: float,
    bias: torch.Tensor | None,
    hash_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is not None and hash_idx is None:
        # learned routing selects on sqrtsoftplus + bias; npu_moe_gating_top_k 2.14 normalizes by softmax or
        # sigmoid before adding the bias (sqrtsoftplus is norm_type 2 only in the custom DSV4 op), so: PyTorch
        return ref_moe.route(logits, topk, route_scale, bias, hash_idx)
    if hash_idx is None or bias is not None:
        raise ValueError("route: pass exactly one of bias (learned routing) and hash_idx (hash routing)")
    # Hash routing: with x = log(sqrtsoftplus(logits)) the op's softmax gives s / sum(s), and its renormalized
    # output over the table's experts is s[idx] / sum(s[idx]) * route_scale, our weights exactly (eps 1e-20).
    scores = torch.nn.functional.softplus(logits.float()).sqrt()
    rows = torch.arange(logits.shape[0], device=logits.device)
    weights, idx, _norm = npu().npu_moe_gating_top_k(
        scores.log(),
        hash_idx.shape[1],
        input_ids=rows,
        tid2eid=hash_idx.to(torch.int64),
        norm_type=0,
        routed_scaling_factor=float(route_scale),
    )
    return weights.float(), idx.long()


@register("rms_norm", "ascend")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    gamma = weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, _rstd = npu().npu_rms_norm(x, gamma.to(x.dtype), epsilon=eps)
    return y


def _rotate_bsnd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """npu_rotary_mul in 'interleave' mode on the last 2*cos.shape[-1] dims of x [B, S, ..., D]."""
    b, s, d = x.shape[0], x.shape[1], x.shape[-1]
    r = 2 * cos.shape[-1]
    x4 = x.reshape(b, s, -1, d)  # BSND with the head axes folded into N
    r1 = cos.repeat_interleave(2, dim=-1)[:, :, None, :].to(x.dtype)  # [B, S, 1, R]: (c0, c0, c1, c1, ...)
    r2 = (-sin if inverse else sin).repeat_interleave(2, dim=-1)[:, :, None, :].to(x.dtype)
    rotated = npu().npu_rotary_mul(x4[..., d - r :].contiguous(), r1, r2, rotary_mode="interleave")
    return torch.cat([x4[..., : d - r], rotated], dim=-1).reshape(x.shape)


@register("rope", "ascend")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    return _rotate_bsnd(x, cos, sin, inverse)


@register("rms_norm_rope", "ascend")
def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    return _rotate_bsnd(rms_norm(x, weight, eps), cos, sin, False)


@register("sinkhorn", "ascend")
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    comb, *_intermediates = npu().npu_mhc_sinkhorn(logits.float(), eps=eps, num_iters=iters)
    return comb


@register("mhc_pre", "ascend")
def mhc_pre(
    streams: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    sinkhorn_iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # npu_mhc_pre returns H_res before Sinkhorn; phi is fn ([n^2+2n, n*D], rows pre | post | res), alpha = scale.
    h_in, h_post, h_res, *_ = npu().npu_mhc_pre(
        streams, fn.float(), scale.float(), base.float(), norm_eps=norm_eps, hc_eps=hc_eps
    )
    return h_in, h_post, sinkhorn(h_res, sinkhorn_iters, hc_eps)


@register("mhc_post", "ascend")
def mhc_post(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    # documented: x_{l+1} = H_res^T x_l + h_out (x) H_post, our comb^T X + post * y
    return npu().npu_mhc_post(streams, comb.float(), y, post.float())


# torch_npu 2.14 has no op spanning the two: npu_mhc_post, then npu_mhc_pre (+ Sinkhorn) on its output
register("mhc_post_pre", "ascend")(post_then_pre(mhc_post, mhc_pre))


@register("grouped_matmul", "ascend")
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[1])
    # one weight tensor [E, K, N], rows split on M (group_type 0) by cumulative ends (group_list_type 0),
    # one output tensor (split_item 3). The documentation does not say what the op does with rows past the last
    # end, so the last group is stretched to M and those rows are zeroed afterwards (the contract's rows of no
    # expert; computed on the last expert, wasted work under expert parallelism).
    ends = group_ends.to(torch.int64)
    stretched = torch.cat([ends[:-1], ends.new_full((1,), x.shape[0])])
    (out,) = npu().npu_grouped_matmul(
        [x],
        [weight.to(x.dtype).transpose(1, 2)],
        group_list=stretched,
        split_item=3,
        group_type=0,
        group_list_type=0,
    )
    return ref_moe.zero_rows_past_end(out, group_ends)


@register("grouped_matmul_fp8", "ascend")
def grouped_matmul_fp8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    # Atlas A3 has no FP8: dequantize (the recipes convert offline to INT8 instead, not implemented here)
    return grouped_matmul(x, dequant_fp8_experts(weight, scale).to(x.dtype), group_ends)


@register("grouped_matmul_mxfp4", "ascend")
def grouped_matmul_mxfp4(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    return grouped_matmul(x, dequant_mxfp4_experts(weight, scale).to(x.dtype), group_ends)


@register("indexer_topk", "ascend")
def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int
) -> torch.Tensor:
    b, s, hi, d = q.shape
    k = min(topk, keys.shape[1])
    if k == 0 or b * s == 0:
        return torch.full((b, s, k), -1, dtype=torch.int64, device=q.device)
    # Each query sees its own number of entries, so every query is its own batch entry (B*S, S=1), keys shared
    # per row (a copy when S > 1; decode has S = 1); sparse_mode 0 with the visible counts as key lengths.
    key = keys.to(q.dtype).repeat_interleave(s, dim=0)[:, :, None, :]  # [B*S, E, 1, D]
    idx, _values = npu().npu_lightning_indexer(
        q.reshape(b * s, 1, hi, d),
        key,
        weights.to(q.dtype).reshape(b * s, 1, hi),
        actual_seq_lengths_query=torch.ones(b * s, dtype=torch.int32, device=q.device),
        actual_seq_lengths_key=visible.reshape(-1).to(torch.int32),
        layout_query="BSND",
        layout_key="BSND",
        sparse_count=k,
        sparse_mode=0,
    )
    return idx.reshape(b, s, k).long()


@register("sparse_attention", "ascend")
def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    n = kv.shape[1]
    if idx.shape[-1] == 0:
        return torch.zeros_like(q)
    # the op wants each row's valid indices first, then the -1 padding
    packed = torch.where(idx >= 0, idx, n).sort(dim=-1).values
    packed = torch.where(packed < n, packed, -1).to(torch.int32)
    kv4 = kv[:, :, None, :]  # [B, N, 1, D]: one shared K=V head
    out, *_softmax_stats = npu().npu_sparse_flash_attention(
        q,
        kv4,
        kv4,
        packed[:, :, None, :],
        float(scale),
        sparse_block_size=1,
        layout_query="BSND",
        layout_kv="BSND",
        sparse_mode=0,
        sinks=sink.float(),
    )
    return out


# Paged decode ops: the rows are gathered and decoded by PyTorch ops on the NPU (torch_npu 2.14 has no op that
# reads our FP8 / MXFP4 page formats), then the adapters above attend / select over them.
@register("paged_sparse_attention", "ascend")
def paged_sparse_attention(
    q: torch.Tensor,
    window: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    entries: PagedRows | None,
    block_tables: torch.Tensor,
    entry_idx: torch.Tensor | None,
    sink: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    keys, valid = ref_paged.gather_rows(window, slots, positions, entries, block_tables, entry_idx)
    idx = torch.where(valid, torch.arange(keys.shape[1], device=q.device), -1)
    return sparse_attention(q[:, None], keys.to(q.dtype), idx[:, None], sink, scale)[:, 0]


@register("paged_indexer_topk", "ascend")
def paged_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: PagedRows,
    block_tables: torch.Tensor,
    visible: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    decoded = ref_paged.all_keys(keys, block_tables)
    return indexer_topk(q[:, None], weights[:, None], decoded, visible[:, None], topk)[:, 0]
