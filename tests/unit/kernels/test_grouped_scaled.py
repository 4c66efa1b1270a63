"""The `tl.dot_scaled` candidate for the decode MXFP4 grouped matmul (kernels/cuda/grouped_scaled.py) vs the
reference, in the interpreter with fp16 activations (`dot_scaled` takes bf16 or fp16, and the interpreter computes
bf16 wrongly; the bf16 case is `gpu`-marked in test_gpu_numerics.py)."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.cuda.grouped_scaled import grouped_matmul_mxfp4_scaled
from dsv4.model_runtime.formats import quant_fp4

pytestmark = pytest.mark.unit


def _experts(e: int, o: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [quant_fp4(torch.randn(o, k) * 0.05) for _ in range(e)]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


@pytest.mark.parametrize(
    ("counts", "tail", "o", "k"),
    [([1, 0, 2, 1], 0, 40, 256), ([3, 0, 17], 5, 130, 128), ([0, 0], 3, 64, 128)],
    ids=["decode-rows", "tiles-and-tail", "no-expert-rows"],
)
def test_dot_scaled_candidate_matches_the_reference(impls, device, counts, tail, o, k, nan_empty):
    """Empty experts, an expert past one 16-row tile, a partial output tile and rows past the last end (zeros,
    stored by the spare tiles: fresh tensors start as NaN here)."""
    ref, _ = impls("grouped_matmul_mxfp4")
    torch.manual_seed(11)
    w, s = _experts(len(counts), o, k, device)
    ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts) + tail, k, device=device).half()
    got = grouped_matmul_mxfp4_scaled(x, w, s, ends)
    assert got.dtype == torch.float16 and got.shape == (x.shape[0], o)
    assert torch.equal(got[sum(counts) :], torch.zeros(tail, o, dtype=torch.float16, device=device))
    want = ref(x[: sum(counts)].float(), w, s, ends)
    torch.testing.assert_close(got[: sum(counts)].float(), want, atol=2e-3, rtol=2e-3)


def test_dot_scaled_candidate_refuses_what_dot_scaled_cannot_take(device):
    w, s = _experts(1, 16, 128, device)
    ends = torch.tensor([2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        grouped_matmul_mxfp4_scaled(torch.randn(2, 128, device=device), w, s, ends)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        w64, s64 = _experts(1, 16, 64, device)
        grouped_matmul_mxfp4_scaled(torch.randn(2, 64, device=device).half(), w64, s64, ends)
    with pytest.raises(ValueError, match="E8M0"):
        grouped_matmul_mxfp4_scaled(torch.randn(2, 128, device=device).half(), w, s.float(), ends)
