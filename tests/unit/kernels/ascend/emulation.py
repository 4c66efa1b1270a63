"""CPU emulations of the torch_npu 2.14 ops the adapters call, written from Huawei's documentation of each op
(the wheel's `_op_plugin_docs.py`): its formula, layouts, output tuple and documented constraints.

They exist to test the adapters on CPU (layout translation, argument order, output selection) and are never
registered as a backend. Where the documentation gives no formula, the assumption is stated at the function;
those are the first things to check on Ascend hardware (kernels/CAPABILITIES.md).
"""

from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)


class DocumentedConstraintError(ValueError):
    """A call outside what the op's documentation allows (dtype, rank, mode): it would fail on the NPU."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DocumentedConstraintError(message)


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps) over the last axis; returns (y, rstd)."""
    x = self.float()
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def npu_rotary_mul(
    self: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
    rotate: torch.Tensor | None = None,
) -> torch.Tensor:
    """output = r1 * input + r2 * x_new, 'interleave': x_new = (-x[1], x[0], -x[3], x[2], ...); input (`self`) 4-D."""
    _require(self.dim() == 4, f"npu_rotary_mul: input must be 4-D, got {self.dim()}-D")
    _require(rotate is None, "emulation covers rotate=None only")
    x = self.float()
    if rotary_mode == "interleave":
        x_new = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    elif rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        x_new = torch.cat((-x2, x1), dim=-1)
    else:
        raise DocumentedConstraintError(f"npu_rotary_mul: rotary_mode {rotary_mode!r} is not 'half'/'interleave'")
    return (r1.float() * x + r2.float() * x_new).to(self.dtype)


def npu_mhc_sinkhorn(
    x: torch.Tensor, eps: float = 1e-6, num_iters: int = 20, out_flag: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Doubly-stochastic projection of H_res [T, n, n] fp32, n in {4, 6, 8}, num_iters in [1, 100].

    ASSUMED formula (the doc names the goal, not the steps): DeepSeek's hc_split_sinkhorn, a row softmax + eps,
    a column normalization, then num_iters - 1 row/column normalizations.
    """
    _require(x.dtype == torch.float32 and x.shape[-1] == x.shape[-2] in (4, 6, 8), "npu_mhc_sinkhorn: fp32, n 4/6/8")
    _require(1 <= num_iters <= 100, "npu_mhc_sinkhorn: num_iters in [1, 100]")
    y = x.softmax(-1) + eps
    y = y / (y.sum(-2, keepdim=True) + eps)
    for _ in range(num_iters - 1):
        y = y / (y.sum(-1, keepdim=True) + eps)
        y = y / (y.sum(-2, keepdim=True) + eps)
    return y, x.new_empty(0), x.new_empty(0)


def npu_mhc_pre(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    gamma: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    hc_eps: float = 1e-6,
    out_flag: int = 0,
    inner_precise: int = 0,
) -> tuple[torch.Tensor, ...]:
    """(h_in, h_post, h_res, inv_rms, h_mix, h_pre); x [T, n, D] bf16/fp16, phi [n^2+2n, nD] fp32, alpha [3].

    ASSUMED gate formulas (the doc lists inputs/outputs and says H_res is returned before Sinkhorn; the formulas
    are the mHC paper's, as in DeepSeek-V4): h_mix = RMSNorm(flatten(x)) @ phi^T, h_pre = sigmoid(alpha0 * mix_pre
    + b_pre) + hc_eps, h_post = 2 sigmoid(alpha1 * mix_post + b_post), h_res = alpha2 * mix_res + b_res.
    """
    t, n, d = x.shape
    _require(x.dtype in _HALF, f"npu_mhc_pre: x must be bf16/fp16, got {x.dtype}")
    _require(phi.shape == (n * n + 2 * n, n * d) and phi.dtype == torch.float32, "npu_mhc_pre: phi [n^2+2n, nD] fp32")
    _require(alpha.shape == (3,) and bias.shape == (n * n + 2 * n,), "npu_mhc_pre: alpha [3], bias [n^2+2n]")
    v = x.flatten(-2).float()
    if gamma is not None:
        v = v * gamma.flatten().float()
    inv_rms = torch.rsqrt(v.square().mean(-1) + norm_eps)
    h_mix = v @ phi.T
    mixed = h_mix * inv_rms[:, None]
    h_pre = torch.sigmoid(alpha[0] * mixed[:, :n] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(alpha[1] * mixed[:, n : 2 * n] + bias[n : 2 * n])
    h_res = (alpha[2] * mixed[:, 2 * n :] + bias[2 * n :]).view(t, n, n)
    h_in = (h_pre[..., None] * x.float()).sum(1).to(x.dtype)
    return h_in, h_post, h_res, inv_rms, h_mix, h_pre


def npu_mhc_post(
    x: torch.Tensor, h_res: torch.Tensor | None, h_out: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """x_{l+1} = H_res^T x_l + h_out (x) H_post (documented); x [T, n, D], h_out [T, D] bf16/fp16."""
    _require(x.dtype in _HALF and h_out.dtype in _HALF, "npu_mhc_post: x and h_out must be bf16/fp16")
    _require(h_res is not None, "npu_mhc_post: h_res=None is only supported on Ascend 950")
    assert h_res is not None
    y = h_res.float().transpose(-1, -2) @ x.float() + h_post.float()[..., None] * h_out.float()[..., None, :]
    return y.to(x.dtype)


def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    group_list: torch.Tensor | None = None,
    split_item: int = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    **unused: object,
) -> list[torch.Tensor]:
    """y_i = x_i @ weight_i per group (documented); covers one x [M, K], one weight [E, K, N], M-axis groups."""
    _require(len(x) == 1 and len(weight) == 1 and group_type == 0 and split_item in (2, 3), "emulated case only")
    _require(group_list is not None and group_list.dtype == torch.int64, "npu_grouped_matmul: group_list int64")
    assert group_list is not None
    ends = group_list.cumsum(0) if group_list_type == 1 else group_list
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    w = weight[0]
    parts = [x[0][int(a) : int(b)].float() @ w[e].float() for e, (a, b) in enumerate(zip(starts, ends, strict=True))]
    return [torch.cat(parts).to(x[0].dtype)]


def npu_lightning_indexer(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: torch.Tensor,
    actual_seq_lengths_query: torch.Tensor | None = None,
    actual_seq_lengths_key: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    layout_query: str = "BSND",
    layout_key: str = "BSND",
    sparse_count: int = 2048,
    sparse_mode: int = 3,
    pre_tokens: int = 2**63 - 1,
    next_tokens: int = 2**63 - 1,
    return_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of sum_h w_h ReLU(q_h . k_t) over each batch's first actual_seq_lengths_key keys (documented formula).

    BSND only: query [B, S, N, D], key [B, S_k, 1, D], weights [B, S, N] bf16/fp16; sparse_mode 0 (no mask).
    Returns (indices int32 [B, S, 1, sparse_count], -1 where fewer keys; values). ASSUMED: the -1 padding.
    """
    _require(layout_query == layout_key == "BSND" and sparse_mode == 0 and block_table is None, "emulated case only")
    _require(query.dtype in _HALF and key.dtype in _HALF and weights.dtype in _HALF, "lightning indexer: bf16/fp16")
    _require(1 <= sparse_count <= 2048, "npu_lightning_indexer: sparse_count in [1, 2048]")
    b, _, _, _ = query.shape
    n_keys = key.shape[1]
    lengths = actual_seq_lengths_key if actual_seq_lengths_key is not None else torch.full((b,), n_keys)
    logits = torch.einsum("bsnd,btd->bsnt", query.float(), key[:, :, 0].float()).relu()
    score = (logits * weights.float()[..., None]).sum(2)  # [B, S, S_k]
    score = score.masked_fill(torch.arange(n_keys) >= lengths.long()[:, None, None], float("-inf"))
    k = min(sparse_count, n_keys)
    values, idx = score.topk(k, dim=-1)
    idx = torch.where(values > float("-inf"), idx, -1)
    pad = sparse_count - k
    idx = torch.nn.functional.pad(idx, (0, pad), value=-1).to(torch.int32)[:, :, None, :]
    return idx, torch.nn.functional.pad(values, (0, pad), value=float("-inf"))[:, :, None, :]


def npu_sparse_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    sparse_indices: torch.Tensor,
    scale_value: float,
    sparse_block_size: int = 1,
    layout_query: str = "BSND",
    layout_kv: str = "BSND",
    sparse_mode: int = 3,
    sinks: torch.Tensor | None = None,
    **unused: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(scale * Q K~^T) V~ over the rows sparse_indices select (documented), each row's valid indices first.

    BSND: query [B, S, N, D], key/value [B, S_kv, 1, D] bf16/fp16, sparse_indices int32 [B, S, 1, K], -1 padding
    only after the valid entries (documented requirement). ASSUMED: `sinks` [N] (in the 2.14 schema, not in the
    doc text) is a per-head logit in the softmax denominator, FlashMLA's attn_sink semantics.
    """
    _require(layout_query == layout_kv == "BSND" and sparse_block_size == 1 and sparse_mode == 0, "emulated case")
    _require(query.dtype in _HALF and key.dtype in _HALF, "npu_sparse_flash_attention: bf16/fp16")
    _require(sparse_indices.dtype == torch.int32, "npu_sparse_flash_attention: sparse_indices int32")
    idx = sparse_indices[:, :, 0].long()  # [B, S, K]
    valid = idx >= 0
    _require(bool((valid[..., 1:] <= valid[..., :-1]).all()), "sparse_indices: valid entries must come first")
    v = (value if value is not None else key)[:, :, 0].float()
    b, s, k = idx.shape
    gathered = torch.gather(v, 1, idx.clamp(min=0).reshape(b, s * k, 1).expand(-1, -1, v.shape[-1]))
    gathered = gathered.view(b, s, k, -1)
    logits = torch.einsum("bsnd,bskd->bsnk", query.float(), gathered) * scale_value
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    sink = (sinks.float() if sinks is not None else torch.full((query.shape[2],), float("-inf")))[None, None, :, None]
    top = torch.maximum(logits.amax(-1, keepdim=True), sink)
    p = (logits - top).exp()
    denom = p.sum(-1, keepdim=True) + (sink - top).exp()
    out = torch.einsum("bsnk,bskd->bsnd", p / denom, gathered).to(query.dtype)
    return out, top.squeeze(-1), denom.squeeze(-1)


def npu_moe_gating_top_k(
    x: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
    k_group: int = 1,
    group_count: int = 1,
    group_select_mode: int = 0,
    renorm: int = 0,
    norm_type: int = 0,
    out_flag: bool = False,
    routed_scaling_factor: float = 1.0,
    eps: float = 1e-20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_out, expert_idx_out int32, norm_out fp32) as documented: norm = softmax (0) or sigmoid (1) of x; experts
    from tid2eid[input_ids] (hash mode) else top-k of norm + bias; y = norm[idx] / (sum + eps) * scaling.
    Covers group_count = k_group = 1, renorm 0 (the only documented renorm value), at most 2048 experts.
    """
    _require(x.dim() == 2 and x.shape[-1] <= 2048, "npu_moe_gating_top_k: x 2-D, at most 2048 experts")
    _require(norm_type in (0, 1) and renorm == 0, "npu_moe_gating_top_k: norm_type 0/1, renorm 0")
    _require(group_count == k_group == 1, "emulated case: no expert groups")
    norm = x.float().softmax(-1) if norm_type == 0 else x.float().sigmoid()
    if tid2eid is not None:
        _require(input_ids is not None and tid2eid.shape[-1] == k, "hash mode: input_ids and tid2eid [*, k]")
        assert input_ids is not None
        idx = tid2eid[input_ids.long()].long()
    else:
        choice = norm + (bias.float() if bias is not None else 0.0)
        idx = choice.topk(k, dim=-1).indices
    y = norm.gather(1, idx)
    y = y / (y.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm
