"""The hot ops of the DeepSeek-V4 model: one typed method per op on `Ops`, the implementations of one backend.

These docstrings are the contract every backend (reference PyTorch, cuda/Triton, ascend/torch_npu) implements:
shapes, dtypes and semantics. Shape letters: B batch, S query tokens, H heads, D head dim, N rows (tokens),
n mHC streams, d hidden size, E experts / entries, K selected entries or input features, k top-k.
Unless stated, float outputs have the dtype of the first float input and internal math is at least fp32.

`bind(device)` looks every op up once, for the backend the device implies (or `DSV4_KERNEL_BACKEND`); a model binds
its `Ops` when it is built and calls them in every forward pass, so no call reads the environment or checks a device.
"""

from __future__ import annotations

import torch

from dsv4.kernels import registry
from dsv4.kernels.paged import PagedRows


class Ops:
    """Every op of one backend, looked up once (raises `KernelBackendError` when the backend cannot run here)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._fns = {name: registry.lookup(name, backend) for name in OP_NAMES}

    def __repr__(self) -> str:
        return f"Ops(backend={self.backend!r})"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """RMSNorm over the last axis: `x * rsqrt(mean(x^2) + eps) * weight`, computed in fp32.

        x [..., D] any float dtype; weight [D] (any float dtype, used in fp32) or None for the unweighted norm.
        Returns [..., D] in x.dtype.
        """
        return self._fns["rms_norm"](x, weight, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Interleaved (GPT-J style) rotary embedding on the LAST R dims of x, R = 2 * cos.shape[-1].

        x [B, S, ..., D] (any number of head axes between S and D); cos, sin [B, S, R/2] fp32 (cos/sin of
        position * inv_freq). Pairs (D-R+2i, D-R+2i+1) are rotated by the angle of pair i (by minus that angle when
        `inverse`, which undoes the rotation); the first D-R dims pass through. Computed in fp32; returns x.dtype.
        """
        return self._fns["rope"](x, cos, sin, inverse)

    def rms_norm_rope(
        self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Fused `rope(rms_norm(x, weight, eps), cos, sin)` (the q / kv / compressed-entry prologue), all in fp32.

        Shapes as `rope` (x [B, S, ..., D], cos/sin [B, S, R/2]); the normalized row is not rounded to x.dtype
        before the rotation, so for bf16 x it is the composition minus one rounding. Returns x.dtype.
        """
        return self._fns["rms_norm_rope"](x, weight, eps, cos, sin)

    def sinkhorn(self, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        """mHC residual mixing matrix from its logits: Sinkhorn-Knopp started from a row softmax.

        logits [N, n, n] fp32. comb = softmax(logits, -1) + eps; comb /= (column sums + eps); then (iters - 1) times:
        comb /= (row sums + eps); comb /= (column sums + eps). Returns [N, n, n] fp32 (columns sum to ~1).
        """
        return self._fns["sinkhorn"](logits, iters, eps)

    def mhc_pre(
        self,
        streams: torch.Tensor,
        fn: torch.Tensor,
        scale: torch.Tensor,
        base: torch.Tensor,
        sinkhorn_iters: int,
        hc_eps: float,
        norm_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC pre-mapping of one sub-layer: collapse the n residual streams into the sub-layer input.

        streams [N, n, d]; fn [(2+n)*n, n*d], scale [3], base [(2+n)*n] (fp32). In fp32:
        v = flatten(streams); mu = fn @ (v * rsqrt(mean(v^2) + norm_eps)); split mu = [pre n | post n | res n*n];
        pre = sigmoid(scale[0]*mu_pre + base_pre) + hc_eps; post = 2*sigmoid(scale[1]*mu_post + base_post);
        comb = sinkhorn(scale[2]*mu_res + base_res viewed [n, n] row-major, sinkhorn_iters, hc_eps).
        Returns (x [N, d] = sum_j pre_j * streams_j in streams.dtype, post [N, n] fp32, comb [N, n, n] fp32).
        """
        return self._fns["mhc_pre"](streams, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps)

    def mhc_post(self, y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """mHC post-mapping: new streams X'_k = post_k * y + sum_j comb[j, k] * X_j  (i.e. comb^T X).

        y [N, d] sub-layer output; streams [N, n, d]; post [N, n]; comb [N, n, n]. Returns [N, n, d] streams.dtype.
        """
        return self._fns["mhc_post"](y, streams, post, comb)

    def mhc_post_pre(
        self,
        y: torch.Tensor,
        streams: torch.Tensor,
        post: torch.Tensor,
        comb: torch.Tensor,
        fn: torch.Tensor,
        scale: torch.Tensor,
        base: torch.Tensor,
        sinkhorn_iters: int,
        hc_eps: float,
        norm_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused boundary between two sub-layers: `new = mhc_post(y, streams, post, comb)` then the next
        sub-layer's `mhc_pre(new, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps)`.

        Arguments as those two ops. The pre-mapping reads `new` as stored (rounded to streams.dtype). Returns
        (new [N, n, d] streams.dtype, x [N, d], post' [N, n] fp32, comb' [N, n, n] fp32); a backend may sum the
        mixing GEMV in another order than its `mhc_pre` (fp32 rounding).
        """
        return self._fns["mhc_post_pre"](y, streams, post, comb, fn, scale, base, sinkhorn_iters, hc_eps, norm_eps)

    def hc_head(
        self,
        streams: torch.Tensor,
        fn: torch.Tensor,
        scale: torch.Tensor,
        base: torch.Tensor,
        hc_eps: float,
        norm_eps: float,
    ) -> torch.Tensor:
        """Final mHC collapse (model head and MTP head): sum_j w_j * X_j.

        streams [N, n, d]; fn [n, n*d], scale [1], base [n] fp32. w = sigmoid(scale * (fn @ rmsnorm(v)) + base) +
        hc_eps with v = flatten(streams) and the unweighted RMS norm of mhc_pre. Returns [N, d] in streams.dtype.
        """
        return self._fns["hc_head"](streams, fn, scale, base, hc_eps, norm_eps)

    def compress_pool(self, kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Compressor pooling: per channel, a softmax over the L slots of a block weights the slot contents.

        kv, score [..., L, C] fp32 (empty slots: kv 0, score -inf; at least one finite score per channel).
        Returns [..., C] = sum_l softmax_l(score)[l] * kv[l], fp32.
        """
        return self._fns["compress_pool"](kv, score)

    def compress_pool_slots(
        self,
        state_kv: torch.Tensor,
        state_score: torch.Tensor,
        slots: torch.Tensor,
        complete: torch.Tensor,
        overlap: bool,
    ) -> torch.Tensor:
        """Compressor pooling of a decode step, read in place from the pool's compressor states.

        state_kv, state_score [S, L, W] fp32, contiguous (a slot's pending block, as `compress_pool` takes it);
        slots [B] int64; complete [B] bool: the rows whose token completes its block. Without `overlap` (HCA,
        W = C) row b pools the L slots of state[slots[b]]; with it (CSA, L = 2m, W = 2C) slots [0, m) give their
        first C channels and slots [m, 2m) their last C. Returns [B, C] fp32: the pooled entry of each complete
        row, zeros elsewhere (rows a backend need not read: a block completes once every m steps).
        """
        return self._fns["compress_pool_slots"](state_kv, state_score, slots, complete, overlap)

    def indexer_topk(
        self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, topk: int
    ) -> torch.Tensor:
        """Lightning-indexer selection: score_{s,e} = sum_h weights[s,h] * ReLU(q[s,h] . keys[e]); top-k per query.

        q [B, S, Hi, D]; weights [B, S, Hi] (already multiplied by D^-1/2 * Hi^-1/2); keys [B, E, D]; visible
        [B, S] int64 = number of entries query s may see (entries e >= visible[b, s] score -inf). Scores are
        rounded to q.dtype after the dot product (fp32 accumulation), after the weighting and after the head sum
        (bf16 q gives the official bf16 scoring; keys and weights are first rounded to q.dtype). k = min(topk, E).
        Returns idx [B, S, k] int64:
        the selected entry indices, -1 where the pick is not visible. Order within a row is unspecified. Ties at
        the k-th score go to the lower entry index (+0.0 and -0.0 are equal): bf16 scores tie often, and a prefill
        must select what the decode steps selected, or a decode that recomputes its prefix continues differently.
        """
        return self._fns["indexer_topk"](q, weights, keys, visible, topk)

    def sparse_attention(
        self, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Shared-K=V sparse attention with a per-head sink over the entries `idx` selects.

        q [B, S, H, D]; kv [B, N, D] (one K=V head: window entries and compressed entries of the row); idx
        [B, S, K] int64 into kv's N axis, -1 = no entry, the valid ones distinct within a row (as the model builds
        them; a repeated index is unspecified: the reference and the kernels may count it once or twice); sink [H]
        fp32. For each query and head, in fp32: s_e = scale * q . kv[e] over the valid e;
        out = sum_e exp(s_e - M) kv[e] / (sum_e exp(s_e - M) + exp(sink_h - M)), M = max(max_e s_e, sink_h).
        A query with no valid entry returns 0.
        Returns [B, S, H, D] in q.dtype.
        """
        return self._fns["sparse_attention"](q, kv, idx, sink, scale)

    def paged_sparse_attention(
        self,
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
        """`sparse_attention` of one decode token per row, reading the paged KV pool in place.

        q [B, H, D]; window [Ns, W, D] the sliding-window rings (position p of a sequence at row p % W of its slot,
        the current token's K=V already written); slots [B] and positions [B] int64 (the token's position t);
        entries the compressed K=V store (`dsv4.kernels.paged`, any format) or None; block_tables [B, T] int32/int64;
        entry_idx [B, K] int64 entry numbers of the row's sequence (< T * entries.rows_per_block; -1 = none) or None.
        Row b attends to the ring rows of positions max(0, t-W+1)..t and to the entries entry_idx[b], decoded from
        the store; only those rows are read. Softmax, sink and scale as `sparse_attention`. Returns [B, H, D] q.dtype.
        """
        return self._fns["paged_sparse_attention"](
            q, window, slots, positions, entries, block_tables, entry_idx, sink, scale
        )

    def paged_indexer_topk(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        keys: PagedRows,
        block_tables: torch.Tensor,
        visible: torch.Tensor,
        topk: int,
    ) -> torch.Tensor:
        """`indexer_topk` of one decode query per row over the indexer keys of the paged pool, read in place.

        q [B, Hi, D]; weights [B, Hi]; keys the CSA indexer-key store (`dsv4.kernels.paged`, any format);
        block_tables [B, T]; visible [B] int64 = keys the row may see (its entries 0..visible-1). Scores, rounding
        and ties exactly as `indexer_topk` over the decoded keys 0..T*rows_per_block-1. k = min(topk,
        T * keys.rows_per_block). Returns idx [B, k] int64 entry numbers, -1 where the pick is not visible.
        """
        return self._fns["paged_indexer_topk"](q, weights, keys, block_tables, visible, topk)

    def route(
        self,
        logits: torch.Tensor,
        topk: int,
        route_scale: float,
        bias: torch.Tensor | None = None,
        hash_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE router: sqrtsoftplus scores, expert choice by biased top-k (learned) or by table (hash).

        logits [N, E] fp32; bias [E] fp32 (selection only) or hash_idx [N, k] int64 (the tid2eid rows of the
        tokens); exactly one of them. scores = sqrt(softplus(logits)); idx = topk(scores + bias) or hash_idx;
        weights = scores[idx] / sum(scores[idx]) * route_scale.
        Returns (weights [N, k] fp32, idx [N, k] int64); the order of the k experts is unspecified; among experts
        with equal biased scores the lower index is chosen (as in `indexer_topk`).
        """
        return self._fns["route"](logits, topk, route_scale, bias, hash_idx)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A projection y = x W^T over a weight kept as the checkpoint stores it (the block-scaled FP8 GEMM).

        x [..., K] float; weight [O, K] in the nn.Linear [out, in] layout: either a float weight of any float dtype
        (scale None), or F8_E4M3 with scale [ceil(O/128), ceil(K/128)] E8M0 or F32, one per 128x128 block:
        W[o, k] = weight[o, k] * scale[o // 128, k // 128]. x and W enter at their exact values (the activations are
        not quantized); products are accumulated in at least fp32. Returns [..., O] in `out_dtype` (default x.dtype):
        a wider out_dtype (fp32 logits, router and compressor projections of a bf16 model) is rounded once, from
        the accumulator, never from a rounded x.dtype result.
        """
        return self._fns["linear"](x, weight, scale, out_dtype)

    def grouped_matmul(self, x: torch.Tensor, weight: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """Grouped expert matmul: rows of x are sorted by expert; rows [ends[e-1], ends[e]) use weight[e].

        x [M, K]; weight [E, O, K] (the experts' weights in the nn.Linear [out, in] layout, any float dtype, used at
        its exact value in x.dtype; the FP8/MXFP4 variants below take the packed weight and its `.scale` instead);
        group_ends [E] int32, cumulative row counts, ends[-1] <= M: the rows from ends[-1] on belong to no expert
        and come back as zeros (expert parallelism sorts the (token, expert) pairs of other ranks' experts there,
        so their number is never read on the host). Returns [M, O] in x.dtype, fp32 accumulation.
        """
        return self._fns["grouped_matmul"](x, weight, group_ends)

    def grouped_matmul_fp8(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
    ) -> torch.Tensor:
        """`grouped_matmul` over FP8 weights dequantized on the fly (the official linear-layer format).

        weight F8_E4M3 [E, O, K]; scale [E, ceil(O/128), ceil(K/128)] E8M0 or F32, one per 128x128 block:
        W[e, o, k] = weight[e, o, k] * scale[e, o // 128, k // 128]. x, group_ends and the result as `grouped_matmul`.
        """
        return self._fns["grouped_matmul_fp8"](x, weight, scale, group_ends)

    def grouped_matmul_mxfp4(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_ends: torch.Tensor
    ) -> torch.Tensor:
        """`grouped_matmul` over MXFP4 weights dequantized on the fly (the official expert format).

        weight I8 [E, O, K/2], two e2m1 codes per byte (low nibble = even column); scale E8M0 [E, O, K/32]:
        W[e, o, k] = e2m1(code[e, o, k]) * scale[e, o, k // 32]. x, group_ends and the result as `grouped_matmul`.
        """
        return self._fns["grouped_matmul_mxfp4"](x, weight, scale, group_ends)

    def swiglu(
        self, gate: torch.Tensor, up: torch.Tensor, limit: float, row_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Clamped SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit) [* row_scale[:, None]].

        gate, up [M, I]; row_scale [M] fp32 (the routing weight, applied before w2) or None (shared expert).
        Computed in fp32; returns gate.dtype.
        """
        return self._fns["swiglu"](gate, up, limit, row_scale)

    def filter_logits(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        min_p: torch.Tensor | None,
    ) -> torch.Tensor:
        """The distribution a sampled token is drawn from, as fp64 logits with the excluded tokens at -inf.

        logits [B, V] any float; temperature [B] (> 0); top_k [B] int64 (0 or >= V = off); top_p [B] (1 = off);
        min_p [B] (0 = off); None for a filter no row uses (the caller knows it without reading the tensors, so the
        op never inspects values on the host). In fp64, per row: x = logits / temperature; top-k keeps x >= the
        k-th largest value (ties kept); top-p keeps the smallest prefix of the tokens sorted by probability (stable
        order) whose mass reaches top_p, i.e. drops a token when the mass strictly ahead of it is >= top_p; min-p
        drops tokens whose probability is < min_p * the row's largest probability (probabilities = softmax after
        top-k). Rows never influence each other. Returns [B, V] fp64.
        """
        return self._fns["filter_logits"](logits, temperature, top_k, top_p, min_p)

    def sample_tokens(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        min_p: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """One token per row: argmax(logits) where temperature <= 0, else argmax(filter_logits(...) + noise).

        logits [B, V]; temperature, top_k, top_p, min_p [B] as in `filter_logits` (None = filter off in every row);
        noise [B, V] fp64 standard Gumbel noise chosen by the caller (the engine seeds it per request and token
        index, which makes a draw reproducible and independent of the batch; it is ignored in greedy rows), or None
        when every row is greedy. Ties go to the lowest token id. Returns [B] int64, without a host sync.
        """
        return self._fns["sample_tokens"](logits, temperature, top_k, top_p, min_p, noise)

    def sample_tokens_seeded(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor | None,
        top_p: torch.Tensor | None,
        min_p: torch.Tensor | None,
        seeds: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """`sample_tokens` with the engine's seeded noise: noise[r, v] = gumbel_noise(seeds, index, V)[r, v]
        (kernels/reference/sampling.py: a counter-based hash of (seeds[r], index[r], v), integer ops, then
        -log(-log(u)) in fp64), so a row's token depends on its own logits, parameters, seed and token index only.

        seeds, index [B] int64 (the request's seed, the index of the token drawn). A backend may compute the noise
        only where a row can draw (its kept tokens) instead of materializing [B, V]. Returns [B] int64, no host sync.
        """
        return self._fns["sample_tokens_seeded"](logits, temperature, top_k, top_p, min_p, seeds, index)


OP_NAMES = tuple(name for name in vars(Ops) if not name.startswith("_"))


def bind(device: torch.device | str, backend: str | None = None) -> Ops:
    """The ops for tensors on `device`: `backend` if given, else `DSV4_KERNEL_BACKEND`, else the device's own."""
    return Ops(backend or registry.backend_for(torch.device(device)))
