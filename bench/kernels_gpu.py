"""Time each Triton (`cuda` backend) kernel against the PyTorch reference and the H200 roofline; JSON lines.

    python bench/kernels_gpu.py [--out FILE] [--experts 32] [--decode]

Shapes are DeepSeek-V4-Flash decode shapes (batch 64 tokens, hidden 4096, 64 heads x 512, indexer 64 x 128,
window 128 + top-k 512, hc_mult 4, experts [2*2048, 4096]) with fewer experts so that a case fits a few
seconds. Each line: op, case, triton_ms and reference_ms (triton.testing.do_bench medians), the minimum bytes
the op must move and its FLOPs, the roofline time max(bytes / bandwidth, flops / peak) at the H200 datasheet
numbers and at the bandwidth/GEMM rate measured in this run, and the fraction of the roofline reached.
`--decode` runs issue #17's decode cases instead (`decode_cases`: batch 1 and 64, 256 routed experts, wo_a, the
sampler, mHC at batch 1, the fused sub-layer boundary `mhc_post_pre` at batch 1 and 64 beside the two kernels it
replaces (suffix `-unfused`); the MXFP4 experts also through the `tl.dot_scaled` candidate, case suffix
`-dot_scaled`). Needs an NVIDIA GPU; the arithmetic helpers import anywhere
(tests/unit/kernels/test_bench_roofline.py).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# H200 SXM datasheet (dense; anchors_kernels.md §6.1): HBM3e bandwidth, bf16 and FP8 tensor-core peaks.
H200_BANDWIDTH = 4.8e12  # B/s
H200_BF16_FLOPS = 989e12
H200_FP8_FLOPS = 1979e12


SCALED = "dsv4.kernels.cuda.grouped_scaled:grouped_matmul_mxfp4_scaled"


@dataclass(frozen=True)
class Case:
    op: str
    name: str
    args: tuple[Any, ...]
    bytes: float  # minimum HBM traffic: every input read once, every output written once
    flops: float
    # the reference is not timed where it would dequantize all 256 experts (gigabytes) at every call
    time_reference: bool = True
    # a candidate timed instead of the registered cuda op (same contract): its import path "module:function", or
    # the function itself
    candidate: str | Callable[..., Any] | None = None


def roofline_ms(n_bytes: float, flops: float, bandwidth: float, peak_flops: float) -> float:
    """The roofline lower bound on the time, in ms: the slower of moving the bytes and doing the FLOPs."""
    if bandwidth <= 0 or peak_flops <= 0:
        raise ValueError("bandwidth and peak must be positive")
    return max(n_bytes / bandwidth, flops / peak_flops) * 1e3


def record(case: Case, triton_ms: float, reference_ms: float | None, measured_bw: float, measured_flops: float) -> dict:
    """One JSON line: timings, roofline at datasheet and measured rates, fraction of each reached (the reference's
    time and the speedup are null where the case does not time the reference)."""
    spec = roofline_ms(case.bytes, case.flops, H200_BANDWIDTH, H200_BF16_FLOPS)
    measured = roofline_ms(case.bytes, case.flops, measured_bw, measured_flops)
    return {
        "bench": "kernels_gpu",
        "op": case.op,
        "case": case.name,
        "triton_ms": round(triton_ms, 4),
        "reference_ms": None if reference_ms is None else round(reference_ms, 4),
        "speedup_vs_reference": None if reference_ms is None else round(reference_ms / triton_ms, 2),
        "bytes": int(case.bytes),
        "flops": int(case.flops),
        "achieved_gbps": round(case.bytes / triton_ms / 1e6, 1),
        "roofline_ms_datasheet": round(spec, 4),
        "roofline_fraction_datasheet": round(spec / triton_ms, 3),
        "roofline_ms_measured": round(measured, 4),
        "roofline_fraction_measured": round(measured / triton_ms, 3),
    }


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Dims:
    """Flash decode dims by default; tests pass tiny ones."""

    t: int = 64  # tokens (batch of decode rows)
    d: int = 4096  # hidden
    h: int = 64  # attention heads
    c: int = 512  # head dim
    rd: int = 64  # RoPE dims
    n_keys: int = 2048  # K=V buffer rows per sequence
    k: int = 640  # window 128 + top-k 512
    e_idx: int = 2048  # indexer keys
    hi: int = 64  # indexer heads
    ic: int = 128  # indexer head dim
    topk: int = 512
    blocks: int = 512  # compressor blocks pooled
    n: int = 4  # hc_mult
    experts: int = 32
    inter: int = 2048
    rows_per_expert: int = 6
    vocab: int = 129280
    window: int = 128  # sliding window
    block_rows: int = 64  # CSA entries per pool block (block_size 256 / m 4)
    routed_experts: int = 256  # Flash's routed experts, 6 per token (decode cases)
    experts_per_token: int = 6
    o_groups: int = 8  # wo_a: 8 groups of o_lora rows over (heads / 8) x head dim columns
    o_lora: int = 1024
    decode_top_k: int = 50  # the sampler cases' top-k
    hca_ratio: int = 128  # an HCA layer's compressor block (the decode pooling case)


def cases(device: torch.device, dims: Dims = Dims()) -> list[Case]:
    """The benchmark cases, tensors allocated on `device` (bf16 where the model runs bf16)."""
    from dsv4.model_runtime.formats import quant_fp4, quant_fp8

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    t, d, h, c, rd = dims.t, dims.d, dims.h, dims.c, dims.rd
    out: list[Case] = []
    x = randn(t, d)
    out.append(Case("rms_norm", f"t{t}xd{d}", (x, randn(d, dtype=torch.float32), 1e-6), 2 * _nbytes(x), 4 * x.numel()))
    q = randn(t, 1, h, c)
    angles = torch.rand(t, 1, rd // 2, generator=g).to(device)
    cos, sin = angles.cos(), angles.sin()
    out.append(Case("rope", f"q{t}x{h}x{c}", (q, cos, sin, False), 2 * _nbytes(q), 6 * t * h * rd))
    out.append(
        Case(
            "rms_norm_rope", f"q{t}x{h}x{c}", (q, None, 1e-6, cos, sin), 2 * _nbytes(q), 4 * q.numel() + 6 * t * h * rd
        )
    )
    n_keys, k = dims.n_keys, dims.k
    kv = randn(t, n_keys, c)
    idx = torch.randint(0, n_keys, (t, 1, k), generator=g).to(device)
    sink = randn(h, dtype=torch.float32)
    gathered = t * k * c * kv.element_size()
    out.append(
        Case(
            "sparse_attention",
            f"b{t}h{h}k{k}d{c}",
            (q, kv, idx, sink, c**-0.5),
            gathered + 2 * _nbytes(q) + _nbytes(idx),
            4 * t * h * k * c,
        )
    )
    e_idx, hi, ic, topk = dims.e_idx, dims.hi, dims.ic, dims.topk
    qi, wi, keys = randn(t, 1, hi, ic), randn(t, 1, hi, std=0.01), randn(t, e_idx, ic)
    visible = torch.full((t, 1), e_idx, device=device)
    out.append(
        Case(
            "indexer_topk",
            f"b{t}e{e_idx}k{topk}",
            (qi, wi, keys, visible, topk),
            _nbytes(qi, wi, keys) + t * topk * 8,
            2 * t * hi * e_idx * ic,
        )
    )
    out += paged_cases(device, dims, randn)
    blocks = randn(dims.blocks, 8, c, dtype=torch.float32), randn(dims.blocks, 8, c, dtype=torch.float32)
    out.append(
        Case("compress_pool", f"blocks{dims.blocks}x8x{c}", blocks, _nbytes(*blocks) * 1.5, 5 * blocks[0].numel())
    )
    # a CSA layer's decode pooling over t rows' states (the previous and the current block's halves), all complete
    csa = randn(t + 1, 8, 2 * c, dtype=torch.float32), randn(t + 1, 8, 2 * c, dtype=torch.float32)
    every = torch.ones(t, dtype=torch.bool, device=device)
    out.append(
        Case(
            "compress_pool_slots",
            f"csa-t{t}x8x{2 * c}",
            (*csa, torch.arange(t, device=device), every, True),
            t * 8 * c * 4 * 2 + t * c * 4,
            5 * t * 8 * c,
        )
    )
    n = dims.n
    streams = randn(t, n, d)
    fn, scale, base = (
        randn((2 + n) * n, n * d, dtype=torch.float32, std=0.01),
        randn(3, dtype=torch.float32),
        randn((2 + n) * n, dtype=torch.float32),
    )
    out.append(
        Case(
            "mhc_pre",
            f"t{t}n{n}d{d}",
            (streams, fn, scale, base, 20, 1e-6, 1e-6),
            _nbytes(streams, fn) + t * d * 2,
            2 * t * fn.numel() + 2 * streams.numel(),
        )
    )
    post, comb = torch.rand(t, n, generator=g).to(device), torch.rand(t, n, n, generator=g).to(device)
    out.append(
        Case(
            "mhc_post",
            f"t{t}n{n}d{d}",
            (x, streams, post, comb),
            _nbytes(x) + 2 * _nbytes(streams),
            2 * n * streams.numel(),
        )
    )
    hw, hb = randn(n, n * d, dtype=torch.float32, std=0.01), randn(n, dtype=torch.float32)
    out.append(
        Case(
            "hc_head",
            f"t{t}n{n}d{d}",
            (streams, hw, randn(1, dtype=torch.float32), hb, 1e-6, 1e-6),
            _nbytes(streams, hw) + t * d * 2,
            2 * t * hw.numel(),
        )
    )
    out += post_pre_cases(t, n, d, randn, "t")
    logits = randn(t, 256, dtype=torch.float32)
    out.append(
        Case(
            "route",
            f"t{t}e256k6",
            (logits, 6, 1.5, randn(256, dtype=torch.float32), None),
            _nbytes(logits),
            10 * logits.numel(),
        )
    )
    w_proj, s_proj = (t.to(device) for t in quant_fp8(torch.randn(d, d, generator=g) * 0.02))
    out.append(
        Case(
            "linear",
            f"fp8-t{t}x{d}x{d}",
            (x, w_proj, s_proj, None),
            _nbytes(x, w_proj, s_proj) + t * d * 2,
            2 * t * d * d,
        )
    )
    head = randn(dims.vocab, d, std=0.02)
    out.append(
        Case(
            "linear",
            f"head-bf16-fp32out-t{t}x{dims.vocab}",
            (x, head, None, torch.float32),
            _nbytes(x, head) + t * dims.vocab * 4,
            2 * t * dims.vocab * d,
        )
    )
    experts, inter = dims.experts, dims.inter
    rows = experts * dims.rows_per_expert
    ends = torch.linspace(rows / experts, rows, experts).round().to(device=device, dtype=torch.int32)
    xe = randn(rows, d)
    w = randn(experts, 2 * inter, d, std=0.02)
    # quantizing on the host is slow (seconds per expert): one expert quantized, repeated; time does not
    # depend on the values
    master = torch.randn(2 * inter, d, generator=g) * 0.02
    mm_flops = 2 * rows * 2 * inter * d
    out.append(
        Case("grouped_matmul", f"e{experts}m{rows}", (xe, w, ends), _nbytes(xe, w) + rows * 2 * inter * 2, mm_flops)
    )
    w8, s8 = (t.to(device).expand(experts, *t.shape).contiguous() for t in quant_fp8(master))
    out.append(
        Case(
            "grouped_matmul_fp8",
            f"e{experts}m{rows}",
            (xe, w8, s8, ends),
            _nbytes(xe, w8, s8) + rows * 2 * inter * 2,
            mm_flops,
        )
    )
    w4, s4 = (t.to(device).expand(experts, *t.shape).contiguous() for t in quant_fp4(master))
    out.append(
        Case(
            "grouped_matmul_mxfp4",
            f"e{experts}m{rows}",
            (xe, w4, s4, ends),
            _nbytes(xe, w4, s4) + rows * 2 * inter * 2,
            mm_flops,
        )
    )
    gate, up = randn(rows, inter), randn(rows, inter)
    out.append(
        Case(
            "swiglu",
            f"m{rows}i{inter}",
            (gate, up, 10.0, torch.rand(rows, generator=g).to(device)),
            3 * _nbytes(gate),
            6 * gate.numel(),
        )
    )
    out.append(
        Case(
            "sinkhorn",
            f"t{t}n{n}",
            (randn(t, n, n, dtype=torch.float32), 20, 1e-6),
            2 * t * n * n * 4,
            20 * 4 * t * n * n,
        )
    )
    # Sampling (PyTorch ops on the device, no Triton kernel): the FLOP count ignores the sorts, a floor only.
    logits = randn(t, dims.vocab, dtype=torch.float32)
    u = torch.rand(t, dims.vocab, generator=g, dtype=torch.float64).clamp_(min=1e-300).to(device)
    filters = (
        torch.full((t,), 0.8, dtype=torch.float64, device=device),
        torch.full((t,), 50, dtype=torch.long, device=device),
        torch.full((t,), 0.9, dtype=torch.float64, device=device),
        torch.zeros(t, dtype=torch.float64, device=device),
    )
    out.append(
        Case("filter_logits", f"t{t}v{dims.vocab}", (logits, *filters), 3 * _nbytes(logits), 10 * logits.numel())
    )
    seeds, index = torch.arange(t, device=device), torch.full((t,), 7, device=device)
    out.append(
        Case(
            "sample_tokens_seeded",
            f"t{t}v{dims.vocab}-topk",
            (logits, filters[0], filters[1], None, None, seeds, index),
            _nbytes(logits),
            4 * logits.numel(),
        )
    )
    out.append(
        Case(
            "sample_tokens",
            f"t{t}v{dims.vocab}",
            (logits, *filters, -torch.log(-torch.log(u))),
            3 * _nbytes(logits) + _nbytes(u),
            12 * logits.numel(),
        )
    )
    return out


def _routed_ends(batch: int, dims: Dims, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Cumulative rows per expert [E] int32 for `batch` tokens routed to distinct random experts, and how many
    experts got rows."""
    picks = torch.stack(
        [torch.randperm(dims.routed_experts, generator=g)[: dims.experts_per_token] for _ in range(batch)]
    )
    counts = torch.bincount(picks.flatten(), minlength=dims.routed_experts)
    return counts.cumsum(0).to(torch.int32), int((counts > 0).sum())


@functools.cache
def _cuda_post_then_pre() -> Callable[..., tuple[torch.Tensor, ...]]:
    from dsv4.kernels.reference.fused import post_then_pre
    from dsv4.kernels.registry import lookup

    return post_then_pre(lookup("mhc_post", "cuda"), lookup("mhc_pre", "cuda"))


def unfused_mhc_post_pre(*args: Any) -> tuple[torch.Tensor, ...]:
    """The cuda `mhc_post` then `mhc_pre` (what `mhc_post_pre` fuses), timed beside the fused kernel. The two ops
    are looked up once, not inside the timed call (imports and registry lookups there would bill the pair a few
    µs of host time that the fused op's case does not pay)."""
    return _cuda_post_then_pre()(*args)


def post_pre_cases(batch: int, n: int, d: int, randn: Callable[..., torch.Tensor], prefix: str) -> list[Case]:
    """The sub-layer boundary `mhc_post_pre` at `batch` rows, fused and (suffix `-unfused`) as the two kernels it
    replaces. Bytes: y, the streams and fn read, the new streams and x written."""
    streams, y = randn(batch, n, d), randn(batch, d)
    post = randn(batch, n, dtype=torch.float32).sigmoid() * 2
    comb = randn(batch, n, n, dtype=torch.float32).softmax(-1)
    fn = randn((2 + n) * n, n * d, dtype=torch.float32, std=0.01)
    args = (y, streams, post, comb, fn, randn(3, dtype=torch.float32), randn((2 + n) * n, dtype=torch.float32))
    args += (20, 1e-6, 1e-6)
    name = f"{prefix}b{batch}n{n}d{d}"
    n_bytes = _nbytes(y, fn) + 2 * _nbytes(streams) + batch * d * 2
    flops = 2 * n * streams.numel() + 2 * batch * fn.numel()
    return [
        Case("mhc_post_pre", name, args, n_bytes, flops),
        Case("mhc_post_pre", f"{name}-unfused", args, n_bytes, flops, candidate=unfused_mhc_post_pre),
    ]


def decode_cases(device: torch.device, dims: Dims = Dims()) -> list[Case]:
    """Issue #17's decode aims at batch 1 and dims.t (64) at Flash shapes: the grouped FP8 / MXFP4 matmuls (routed
    experts' fused gate/up [2 x 2048, 4096] over 256 experts, 6 per token; `wo_a`'s 8 FP8 groups [1024, 4096]),
    mHC pre and the hyper head at batch 1, the fused sub-layer boundary `mhc_post_pre` (and the two kernels it
    replaces) at both batches, an HCA layer's decode pooling, and the sampler (temperature + top-k
    draws with the caller's noise and with the seeded noise the engine uses, a seeded draw without top-k, a seeded
    top-p + min-p draw, the top-k filter). The bytes count only what an ideal kernel must move: the weights of the
    experts that got rows, the noise of the tokens a top-k draw keeps (none when the kernel hashes it), the state
    of the rows whose block completes."""
    from dsv4.model_runtime.formats import quant_fp4, quant_fp8

    g = torch.Generator(device="cpu").manual_seed(2)

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    d, inter, n, vocab = dims.d, dims.inter, dims.n, dims.vocab
    # one master quantized on the host (seconds), repeated over the experts: time does not depend on the values
    master = torch.randn(2 * inter, d, generator=g) * 0.02
    packed = {
        fmt: tuple(t.to(device).expand(dims.routed_experts, *t.shape).contiguous() for t in quant(master))
        for fmt, quant in (("fp8", quant_fp8), ("mxfp4", quant_fp4))
    }
    wo_k = dims.h * dims.c // dims.o_groups
    wo_master = torch.randn(dims.o_lora, wo_k, generator=g) * 0.02
    wo_a = tuple(t.to(device).expand(dims.o_groups, *t.shape).contiguous() for t in quant_fp8(wo_master))
    out: list[Case] = []
    for batch in (1, dims.t):
        ends, used = _routed_ends(batch, dims, g)
        rows = batch * dims.experts_per_token
        x = randn(rows, d)
        for fmt, (w, sc) in packed.items():
            per_expert = (w.numel() * w.element_size() + sc.numel() * sc.element_size()) // dims.routed_experts
            name = f"decode-b{batch}-routed-e{dims.routed_experts}k{dims.experts_per_token}-{2 * inter}x{d}"
            # MXFP4 also through the tl.dot_scaled candidate (kernels/cuda/grouped_scaled.py), on the same inputs
            variants = [(name, None)] + ([(f"{name}-dot_scaled", SCALED)] if fmt == "mxfp4" else [])
            for case_name, candidate in variants:
                out.append(
                    Case(
                        f"grouped_matmul_{fmt}",
                        case_name,
                        (x, w, sc, ends.to(device)),
                        used * per_expert + _nbytes(x) + rows * 2 * inter * 2,
                        2 * rows * 2 * inter * d,
                        time_reference=False,
                        candidate=candidate,
                    )
                )
        xa = randn(dims.o_groups * batch, wo_k)
        group_ends = torch.arange(1, dims.o_groups + 1, dtype=torch.int32, device=device) * batch
        out.append(
            Case(
                "grouped_matmul_fp8",
                f"decode-b{batch}-wo_a-g{dims.o_groups}-{dims.o_lora}x{wo_k}",
                (xa, *wo_a, group_ends),
                _nbytes(xa, *wo_a) + dims.o_groups * batch * dims.o_lora * 2,
                2 * dims.o_groups * batch * dims.o_lora * wo_k,
            )
        )
        logits = randn(batch, vocab, dtype=torch.float32, std=4.0)
        temperature = torch.full((batch,), 0.8, dtype=torch.float64, device=device)
        top_k = torch.full((batch,), dims.decode_top_k, dtype=torch.long, device=device)
        u = torch.rand(batch, vocab, generator=g, dtype=torch.float64).clamp_(min=1e-300).to(device)
        noise = -torch.log(-torch.log(u))
        out.append(
            Case(
                "sample_tokens",
                f"decode-b{batch}v{vocab}-temperature-topk{dims.decode_top_k}",
                (logits, temperature, top_k, None, None, noise),
                _nbytes(logits) + batch * dims.decode_top_k * 8 + batch * 8,
                4 * logits.numel(),
            )
        )
        seeds, index = torch.arange(batch, device=device), torch.full((batch,), 7, device=device)
        for name, k in ((f"-topk{dims.decode_top_k}", top_k), ("", None)):
            # the noise is hashed in the kernel, for the kept tokens only: the logits are all that must move
            out.append(
                Case(
                    "sample_tokens_seeded",
                    f"decode-b{batch}v{vocab}-temperature{name}",
                    (logits, temperature, k, None, None, seeds, index),
                    _nbytes(logits) + batch * 8,
                    4 * logits.numel(),
                )
            )
        top_p = torch.full((batch,), 0.95, dtype=torch.float64, device=device)
        min_p = torch.full((batch,), 0.02, dtype=torch.float64, device=device)
        out.append(
            Case(
                "sample_tokens_seeded",
                f"decode-b{batch}v{vocab}-temperature-topp0.95-minp0.02",
                (logits, temperature, None, top_p, min_p, seeds, index),
                _nbytes(logits) + batch * 8,
                30 * logits.numel(),
            )
        )
        out.append(
            Case(
                "filter_logits",
                f"decode-b{batch}v{vocab}-temperature-topk{dims.decode_top_k}",
                (logits, temperature, top_k, None, None),
                _nbytes(logits) + logits.numel() * 8,
                2 * logits.numel(),
            )
        )
        # An HCA layer's pooling in a decode step: one row completes its block (a block completes once every m
        # steps per row); an ideal kernel reads that row's state only, the reference gathers every row's.
        m = dims.hca_ratio
        state_kv = randn(batch + 1, m, dims.c, dtype=torch.float32)
        state_score = randn(batch + 1, m, dims.c, dtype=torch.float32)
        complete = torch.zeros(batch, dtype=torch.bool, device=device)
        complete[0] = True
        out.append(
            Case(
                "compress_pool_slots",
                f"decode-b{batch}-hca-m{m}c{dims.c}-1-complete",
                (state_kv, state_score, torch.arange(batch, device=device), complete, False),
                2 * m * dims.c * 4 + batch * (dims.c * 4 + 9),
                5 * m * dims.c,
            )
        )
    streams = randn(1, n, d)
    fn = randn((2 + n) * n, n * d, dtype=torch.float32, std=0.01)
    base = randn((2 + n) * n, dtype=torch.float32)
    out.append(
        Case(
            "mhc_pre",
            f"decode-b1n{n}d{d}",
            (streams, fn, randn(3, dtype=torch.float32), base, 20, 1e-6, 1e-6),
            _nbytes(streams, fn) + d * 2,
            2 * fn.numel() + 2 * streams.numel(),
        )
    )
    hw = randn(n, n * d, dtype=torch.float32, std=0.01)
    out.append(
        Case(
            "hc_head",
            f"decode-b1n{n}d{d}",
            (streams, hw, randn(1, dtype=torch.float32), randn(n, dtype=torch.float32), 1e-6, 1e-6),
            _nbytes(streams, hw) + d * 2,
            2 * hw.numel(),
        )
    )
    for batch in (1, dims.t):
        out += post_pre_cases(batch, n, d, randn, "decode-")
    return out


def paged_cases(device: torch.device, dims: Dims, randn: Callable[..., torch.Tensor]) -> list[Case]:
    """The paged decode ops over a pool in the engine's formats (FP8 entries and MXFP4 keys where the dims allow,
    else the model dtype): t rows, each with e_idx entries in its own blocks, top-k of them attended."""
    from dsv4.kernels.paged import PagedRows
    from dsv4.model_runtime.engine.kv_layout import FP4Codec, FP8NopeCodec, RowCodec

    t, h, c, rd, e, rpb = dims.t, dims.h, dims.c, dims.rd, dims.e_idx, dims.block_rows
    n_blocks = -(-e // rpb)
    tables = torch.arange(t * n_blocks, device=device, dtype=torch.int32).view(t, n_blocks)

    def store(codec: RowCodec) -> PagedRows:
        encoded = codec.encode(randn(t * n_blocks * rpb + 1, codec.width, std=0.5))
        return PagedRows(codec.format, tuple(encoded[f.name] for f in codec.fields), rpb, codec.width, torch.bfloat16)

    bf16 = torch.bfloat16
    entries = store(FP8NopeCodec(c, bf16, rd) if (c - rd) % 64 == 0 else RowCodec(c, bf16))
    keys = store(FP4Codec(dims.ic, bf16) if dims.ic % 32 == 0 else RowCodec(dims.ic, bf16))
    q, window = randn(t, h, c), randn(t + 1, dims.window, c)
    slots = torch.arange(t, device=device)
    positions = torch.full((t,), 4 * e - 1, device=device)  # CSA m = 4: every entry visible
    topk = min(dims.topk, e)
    g = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)]).to(device)
    sink = randn(h, dtype=torch.float32)
    entry_bytes = sum(x.shape[-1] * x.element_size() for x in entries.tensors)
    read = t * (dims.window * c * 2 + topk * entry_bytes)
    out = [
        Case(
            "paged_sparse_attention",
            f"b{t}h{h}w{dims.window}k{topk}d{c}-{entries.format}",
            (q, window, slots, positions, entries, tables, idx, sink, c**-0.5),
            read + 2 * _nbytes(q) + _nbytes(idx, tables),
            4 * t * h * (dims.window + topk) * c,
        )
    ]
    qi, wi = randn(t, dims.hi, dims.ic), randn(t, dims.hi, std=0.01)
    key_bytes = sum(x.shape[-1] * x.element_size() for x in keys.tensors)
    out.append(
        Case(
            "paged_indexer_topk",
            f"b{t}e{e}k{dims.topk}-{keys.format}",
            (qi, wi, keys, tables, torch.full((t,), e, device=device), dims.topk),
            t * e * key_bytes + _nbytes(qi, wi, tables) + t * topk * 8,
            2 * t * dims.hi * e * dims.ic,
        )
    )
    return out


def measure_device(bench: Callable[[Callable[[], Any]], float], device: torch.device) -> tuple[float, float]:
    """(copy bandwidth B/s, bf16 GEMM FLOP/s) measured here: 1 GiB device copy, 8192^3 matmul."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    gemm_ms = bench(lambda: a @ a)
    return 2 * src.numel() / (copy_ms * 1e-3), 2 * 8192**3 / (gemm_ms * 1e-3)


def _candidate(path: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """The function ("module:name", or itself) a case times instead of the registered op (None: the registered op)."""
    if path is None or callable(path):
        return path
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--experts", type=int, default=Dims.experts, help="experts in the grouped-matmul cases")
    parser.add_argument(
        "--decode", action="store_true", help="only the decode cases of issue #17 (batch 1 and 64, Flash shapes)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "kernels_gpu", "error": "no CUDA device"}))
        return 1
    import triton.testing

    import dsv4.kernels.cuda  # noqa: F401  registers the Triton kernels, compiled for the GPU
    from dsv4.kernels.registry import lookup

    def bench(fn: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=50))

    device = torch.device("cuda")
    bw, flops = measure_device(bench, device)
    lines = [
        {
            "bench": "kernels_gpu",
            "device": torch.cuda.get_device_name(),
            "copy_bandwidth_gbps": round(bw / 1e9),
            "bf16_gemm_tflops": round(flops / 1e12),
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
    ]
    print(json.dumps(lines[0]), flush=True)
    dims = Dims(experts=args.experts)
    for case in decode_cases(device, dims) if args.decode else cases(device, dims):
        try:
            cuda_fn, ref_fn = _candidate(case.candidate) or lookup(case.op, "cuda"), lookup(case.op, "reference")
            t_ms = bench(lambda f=cuda_fn, a=case.args: f(*a))
            r_ms = bench(lambda f=ref_fn, a=case.args: f(*a)) if case.time_reference else None
            lines.append(record(case, t_ms, r_ms, bw, flops))
        except Exception as e:  # one failing kernel must not hide the others' numbers
            lines.append({"bench": "kernels_gpu", "op": case.op, "case": case.name, "error": repr(e)[:500]})
        print(json.dumps(lines[-1]), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
