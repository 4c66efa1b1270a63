"""Triton router and grouped expert matmul (plain, FP8 block-scaled, MXFP4) vs the reference (fp32).

FP8 and MXFP4 weights are only decoded in the kernels (e4m3/e2m1 -> fp32, exact in the interpreter); nothing
here casts to FP8, the case the interpreter gets wrong.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.reference.quant_moe import dequant_fp8_experts, dequant_mxfp4_experts
from dsv4.model_runtime.formats import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

pytestmark = pytest.mark.unit


def _by_expert(weights: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx.argsort(dim=-1)
    return weights.gather(-1, order), idx.gather(-1, order)


@pytest.mark.parametrize(("n", "e", "k"), [(5, 12, 3), (1, 8, 2), (0, 8, 2), (9, 256, 6)])
def test_route_learned(impls, device, n, e, k):
    ref, cuda = impls("route")
    torch.manual_seed(0)
    logits, bias = torch.randn(n, e, device=device) * 3, torch.randn(e, device=device)
    got, want = _by_expert(*cuda(logits, k, 1.5, bias, None)), _by_expert(*ref(logits, k, 1.5, bias, None))
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)


def test_route_ties_go_to_the_lower_expert(impls, device):
    logits = torch.tensor([[0.5, 2.0, 0.5, 2.0, 0.5, -1.0]], device=device)
    for impl in impls("route"):
        _, idx = impl(logits, 3, 1.0, torch.zeros(6, device=device), None)
        assert sorted(idx[0].tolist()) == [0, 1, 3], impl


def test_route_hash(impls, device):
    ref, cuda = impls("route")
    torch.manual_seed(1)
    logits, table = torch.randn(6, 10, device=device) * 40, torch.randint(0, 10, (6, 3), device=device)
    got, want = cuda(logits, 3, 2.5, None, table), ref(logits, 3, 2.5, None, table)
    torch.testing.assert_close(got[1], table)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        cuda(logits, 3, 2.5, torch.zeros(10, device=device), table)


def _ends(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


@pytest.mark.parametrize(
    ("counts", "o", "k"),
    [([3, 0, 20, 1], 24, 40), ([0, 0, 0], 16, 16), ([70, 200], 36, 132), ([1], 8, 8)],
    ids=["ragged-with-empty-expert", "no-rows", "prefill-tiles", "single"],
)
def test_grouped_matmul(impls, device, counts, o, k):
    ref, cuda = impls("grouped_matmul")
    torch.manual_seed(2)
    x, w = torch.randn(sum(counts), k, device=device), torch.randn(len(counts), o, k, device=device)
    ends = _ends(counts, device)
    out = cuda(x, w, ends)
    assert out.shape == (sum(counts), o)
    torch.testing.assert_close(out, ref(x, w, ends), atol=1e-4, rtol=1e-5)


def _fp8_experts(e: int, o: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quant_fp8(torch.randn(o, k) * 0.05) for _ in range(e)]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


def _fp4_experts(e: int, o: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quant_fp4(torch.randn(o, k) * 0.05) for _ in range(e)]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


def test_reference_dequant_matches_the_checkpoint_formats():
    torch.manual_seed(3)
    w8, s8 = _fp8_experts(2, 130, 260, torch.device("cpu"))
    w4, s4 = _fp4_experts(2, 24, 64, torch.device("cpu"))
    for e in range(2):
        torch.testing.assert_close(dequant_fp8_experts(w8, s8)[e], dequant_fp8(w8[e], s8[e]), atol=0, rtol=0)
        torch.testing.assert_close(dequant_mxfp4_experts(w4, s4)[e], dequant_fp4(w4[e], s4[e]), atol=0, rtol=0)


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize(("counts", "o", "k"), [([5, 0, 17], 130, 260), ([2, 3], 128, 128)], ids=["partial", "full"])
def test_grouped_matmul_fp8(impls, device, scale_dtype, counts, o, k):
    ref, cuda = impls("grouped_matmul_fp8")
    torch.manual_seed(4)
    w, s = _fp8_experts(len(counts), o, k, device)
    s = s.to(scale_dtype)
    x, ends = torch.randn(sum(counts), k, device=device), _ends(counts, device)
    torch.testing.assert_close(cuda(x, w, s, ends), ref(x, w, s, ends), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("counts", "o", "k"), [([5, 0, 17], 24, 64), ([1, 1], 40, 96)], ids=["ragged", "decode"])
def test_grouped_matmul_mxfp4(impls, device, counts, o, k):
    ref, cuda = impls("grouped_matmul_mxfp4")
    torch.manual_seed(5)
    w, s = _fp4_experts(len(counts), o, k, device)
    x, ends = torch.randn(sum(counts), k, device=device), _ends(counts, device)
    torch.testing.assert_close(cuda(x, w, s, ends), ref(x, w, s, ends), atol=1e-4, rtol=1e-5)


def test_mxfp4_decodes_every_code_and_tiny_scales(impls, device):
    """All 16 e2m1 codes against E8M0 scales from 2^-127 (code 0, subnormal) to 2^8."""
    ref, cuda = impls("grouped_matmul_mxfp4")
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)  # 64 columns
    packed = (codes[0::2] | (codes[1::2] << 4)).view(torch.int8).repeat(3, 1)[None]  # [1, 3, 32]
    scale = torch.tensor([[[0, 127], [120, 135], [127, 127]]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    x = torch.eye(64)[:5] + torch.randn(5, 64) * 0.0
    w, s, x = packed.to(device), scale.to(device), x.to(device)
    ends = _ends([5], device)
    torch.testing.assert_close(cuda(x, w, s, ends), ref(x, w, s, ends), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["plain", "fp8", "mxfp4"])
@pytest.mark.parametrize("tail", [3, 40], ids=["gemv", "tiled"])
def test_rows_past_the_last_end_belong_to_no_expert(impls, device, fmt, tail, nan_empty):
    """ends[-1] < M (expert parallelism's pairs of other ranks' experts): those rows come back 0 on both backends,
    the rest as if they were absent; 3 trailing rows keep the decode GEMV, 40 the tiled kernel. New float tensors
    start as NaN here, so the zeros must be the kernels' own stores (the schedule's spare tiles), not a fresh
    allocation's."""
    torch.manual_seed(9)
    counts, o, k = [2, 0, 1], 40, 64
    if fmt == "plain":
        weight: tuple[torch.Tensor, ...] = (torch.randn(3, o, k, device=device),)
    else:
        weight = (_fp8_experts if fmt == "fp8" else _fp4_experts)(3, o, k, device)
    op = "grouped_matmul" if fmt == "plain" else f"grouped_matmul_{fmt}"
    ref, cuda = impls(op)
    x, ends = torch.randn(sum(counts) + tail, k, device=device), _ends(counts, device)
    x[sum(counts) :] = float("nan")  # nothing of these rows may reach the output
    want = ref(x[: sum(counts)], *weight, ends)
    for impl in (ref, cuda):
        got = impl(x, *weight, ends)
        assert got.shape == (sum(counts) + tail, o)
        assert torch.equal(got[sum(counts) :], torch.zeros(tail, o, device=device))
        torch.testing.assert_close(got[: sum(counts)], want, atol=1e-4, rtol=1e-5)
