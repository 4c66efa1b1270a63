"""The `linear` op (a projection over a weight kept as stored): Triton vs reference in fp32 (interpreter), and the
reference against the checkpoint formats' own decoder in float64."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.registry import lookup
from dsv4.model_runtime.formats import dequant_fp8, quant_fp8

pytestmark = pytest.mark.unit


def _fp8(o: int, k: int, scale_dtype: torch.dtype = torch.float8_e8m0fnu) -> tuple[torch.Tensor, torch.Tensor]:
    w, s = quant_fp8(torch.randn(o, k) * 0.05)
    return w, s.to(scale_dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
@pytest.mark.parametrize(
    ("lead", "o", "k"),
    [((1,), 256, 128), ((3, 5), 130, 260), ((70,), 64, 200), ((0,), 128, 128), ((2, 1), 300, 64)],
    ids=["decode", "partial-blocks", "prefill-tiles", "no-rows", "k-below-a-block"],
)
def test_fp8_weight_matches_the_reference(impls, device, scale_dtype, lead, o, k):
    ref, cuda = impls("linear")
    torch.manual_seed(0)
    w, s = _fp8(o, k, scale_dtype)
    x = torch.randn(*lead, k)
    w, s, x = w.to(device), s.to(device), x.to(device)
    got = cuda(x, w, s, None)
    assert got.shape == (*lead, o) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref(x, w, s, None), atol=1e-4, rtol=1e-5)


def test_float_weight_in_a_narrower_dtype_and_a_wider_output(impls, device):
    """A weight kept in fp16 under fp32 activations (the kernel path: mixed dtypes), fp32 and float64 outputs."""
    ref, cuda = impls("linear")
    torch.manual_seed(1)
    x, w = torch.randn(9, 96, device=device), (torch.randn(40, 96) * 0.1).half().to(device)
    got = cuda(x, w, None, None)
    torch.testing.assert_close(got, ref(x, w, None, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, x @ w.float().T, atol=1e-5, rtol=1e-5)


def test_reference_decodes_like_the_checkpoint_format():
    """The reference's on-the-fly decode is the loader's old dequantize (exact), for whole and partial blocks."""
    torch.manual_seed(2)
    for o, k in ((256, 384), (130, 260)):
        w, s = _fp8(o, k)
        x = torch.randn(4, k, dtype=torch.float64)
        got = lookup("linear", "reference")(x, w, s, None)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, x @ dequant_fp8(w, s, torch.float64).T, atol=0, rtol=0)


def test_reference_out_dtype_rounds_once_from_the_accumulator():
    """bf16 activations and weight with fp32 output equal the fp32 product of the same values (no bf16 rounding)."""
    torch.manual_seed(3)
    x, w = torch.randn(3, 512).bfloat16(), torch.randn(64, 512).bfloat16()
    got = lookup("linear", "reference")(x, w, None, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ w.float().T, atol=1e-5, rtol=1e-6)
    assert not torch.equal(got, (x @ w.T).float())  # a bf16 result would have been rounded
