"""Triton RMSNorm, RoPE (forward and inverse), fused RMSNorm+RoPE and clamped SwiGLU vs the reference (fp32)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.unit


def _cos_sin(b: int, s: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(b, s, half, device=device) * 6.28
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4, 33), (1, 128), (0, 16)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(impls, device, shape, weighted):
    ref, cuda = impls("rms_norm")
    torch.manual_seed(0)
    x = torch.randn(shape, device=device) * 3
    w = torch.randn(shape[-1], device=device) if weighted else None
    out = cuda(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "half"),
    [((2, 3, 5, 24), 4), ((2, 1, 12), 6), ((1, 4, 2, 3, 10), 5), ((3, 2, 4, 8), 4)],
    ids=["heads", "no-head-axis", "two-head-axes", "all-rotated"],
)
@pytest.mark.parametrize("inverse", [False, True])
def test_rope(impls, device, shape, half, inverse):
    ref, cuda = impls("rope")
    torch.manual_seed(1)
    x = torch.randn(shape, device=device)
    cos, sin = _cos_sin(shape[0], shape[1], half, device)
    out = cuda(x, cos, sin, inverse)
    torch.testing.assert_close(out, ref(x, cos, sin, inverse), atol=1e-6, rtol=1e-5)
    # the non-rotated prefix is untouched; the inverse undoes the rotation
    torch.testing.assert_close(out[..., : shape[-1] - 2 * half], x[..., : shape[-1] - 2 * half], atol=0, rtol=0)
    torch.testing.assert_close(cuda(out, cos, sin, not inverse), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_rope_is_the_composition(impls, device, weighted):
    ref, cuda = impls("rms_norm_rope")
    ref_norm, _ = impls("rms_norm")
    ref_rope, _ = impls("rope")
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, 40, device=device)
    w = torch.randn(40, device=device) if weighted else None
    cos, sin = _cos_sin(2, 5, 8, device)
    out = cuda(x, w, 1e-6, cos, sin)
    torch.testing.assert_close(out, ref(x, w, 1e-6, cos, sin), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_rope(ref_norm(x, w, 1e-6), cos, sin, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_swiglu_clamps_and_scales(impls, device, scaled, rows):
    ref, cuda = impls("swiglu")
    torch.manual_seed(3)
    full = torch.randn(rows, 2 * 19, device=device) * 12  # beyond the limit on both sides
    gate, up = full[:, :19], full[:, 19:]  # strided views, as the MoE passes them
    scale = torch.rand(rows, device=device) if scaled else None
    out = cuda(gate, up, 10.0, scale)
    torch.testing.assert_close(out, ref(gate, up, 10.0, scale), atol=1e-5, rtol=1e-5)
