"""The official QAT simulations (oracle_notes §3) against their documented definitions, and their effect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv4.kernels.reference.attention import indexer_scores
from dsv4.model_runtime import load_model
from dsv4.model_runtime.formats import dequant_fp4, e2m1_round, quant_fp4, quant_fp8
from dsv4.model_runtime.qat import hadamard, q4, q8, q8_nope

pytestmark = pytest.mark.unit


def _block(values: list[float], size: int) -> torch.Tensor:
    x = torch.zeros(size)
    x[: len(values)] = torch.tensor(values)
    return x


def test_q8_rounds_to_nearest_even_with_unit_scale() -> None:
    # amax 448 -> s = 2^ceil(log2(448/448)) = 1; e4m3 spacing in [1, 2) is 1/8; midpoints go to the even mantissa.
    x = _block([448.0, 1 + 1 / 16, 1 + 3 / 16, 1.1, -2.0], 64)
    assert q8(x)[:5].tolist() == [448.0, 1.0, 1.25, 1.125, -2.0]


def test_q8_scale_is_the_next_power_of_two() -> None:
    # amax 449 > 448 -> s = 2: 449/2 = 224.5 and 447/2 = 223.5 both round to 224 (spacing 16 in [128, 256)).
    assert q8(_block([449.0, 447.0, 1.0], 64))[:3].tolist() == [448.0, 448.0, 1.0]
    # amax 448 * 2^-10 exactly -> s = 2^-10, so x = amax survives unchanged.
    v = 448 * 2.0**-10
    assert q8(_block([v, v / 3], 64))[0].item() == v


def test_q8_blocks_are_64_wide_and_independent() -> None:
    x = torch.cat([_block([448.0, 0.3], 64), _block([1e-3, 3e-4], 64)])
    y = q8(x)
    assert y[1].item() == 0.3125  # in the big block 0.3 is on the coarse grid (s = 1: spacing 2^-5 near 0.3)
    assert abs(y[65].item() - 3e-4) / 3e-4 < 2**-4  # the small block keeps its own fine scale
    assert q8(torch.zeros(64)).eq(0).all()  # amax floor 1e-4: no division by zero


def test_q8_nope_leaves_the_rope_dims_alone() -> None:
    x = torch.randn(2, 192) * 3
    y = q8_nope(x, 64)
    assert torch.equal(y[:, 128:], x[:, 128:])
    assert torch.equal(y[:, :128], q8(x[:, :128]))
    assert not torch.equal(y[:, :128], x[:, :128])


def test_q4_grid_and_ties_to_even_code() -> None:
    # amax 6 -> s = 1; ties per oracle_notes: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    x = _block([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 2.9, -0.6, 0.26], 32)
    assert q4(x)[:12].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 3.0, -0.5, 0.5]


def test_q4_scale_rule_and_blocks_of_32() -> None:
    # amax 6.5 -> s = 2^ceil(log2(6.5/6)) = 2: grid step 1 near 1, so 1.4 -> 1 and 6.5 -> 6 (3.25 -> 3).
    x = torch.cat([_block([6.5, 1.4], 32), _block([0.75, 0.1], 32)])
    y = q4(x)
    assert y[:2].tolist() == [6.0, 1.0]
    # Second block: amax 0.75 -> s = 2^ceil(log2(0.125)) = 0.125: 0.75 -> 6*s exactly, 0.1 -> 0.8 grid -> 1*s.
    assert y[32:34].tolist() == [0.75, 0.125]
    assert q4(torch.zeros(32)).eq(0).all()


def test_hadamard_is_sylvester_orthonormal_and_self_inverse() -> None:
    e = torch.eye(4)
    assert torch.allclose(hadamard(e), torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2)
    x = torch.randn(3, 128, dtype=torch.float64)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-12)
    assert torch.allclose(hadamard(x).norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.zeros(96))


def test_weight_formats_round_trip() -> None:
    w = torch.randn(200, 256) * 0.02
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and tuple(s.shape) == (2, 2)
    exact = q.float() * s.float().repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)
    assert torch.equal(quant_fp8(exact)[0].float(), q.float())  # representable weights survive unchanged
    packed, scale = quant_fp4(w)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (200, 128) and tuple(scale.shape) == (200, 8)
    dq = dequant_fp4(packed, scale)
    assert torch.equal(dequant_fp4(*quant_fp4(dq)), dq)
    # Low nibble is the even column: codes 2 (1.0) and 0xB (-1.5) at scale 1.
    one = dequant_fp4(
        torch.tensor([[0xB2] + [0] * 15], dtype=torch.uint8).view(torch.int8), torch.ones(1, 1).to(torch.float8_e8m0fnu)
    )
    assert one[0, :2].tolist() == [1.0, -1.5]
    assert e2m1_round(torch.tensor([0.7, -2.6])).tolist() == [0.5, -3.0]


def test_bf16_indexer_scoring_rounds_like_pytorch_bf16_ops() -> None:
    """The official scoring is bf16 einsum -> ReLU -> bf16 multiply by the weights -> bf16 head sum."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 16, 128, generator=g).bfloat16()
    keys = torch.randn(2, 9, 128, generator=g).bfloat16()
    w = (torch.rand(2, 5, 16, generator=g) * 0.1).bfloat16()
    official = (torch.einsum("bshd,btd->bsht", q, keys).relu_() * w.unsqueeze(-1)).sum(dim=2)
    assert official.dtype == torch.bfloat16
    assert torch.equal(indexer_scores(q, w, keys), official.float())
    exact = (torch.einsum("bshd,btd->bsht", q.double(), keys.double()).relu() * w.double().unsqueeze(-1)).sum(2)
    assert not torch.equal(indexer_scores(q, w, keys).double(), exact)  # bf16 rounding is really applied


# ---- the simulations inside the model -------------------------------------------------------------------------


def test_model_applies_each_simulation_where_documented(
    checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    ckpt = checkpoint("tiny-flash", True)
    x = ids(1, 24, seed=5)
    for qat in (True, False):
        model = load_model(ckpt, qat_simulation=qat)
        state = model.new_state()
        model.prefill(x, [state])
        csa = state.layers[2]  # tiny-flash layer 2 is CSA, layer 3 HCA
        nope = model.cfg.nope_head_dim
        stored = {
            "window K=V": csa.window[:, :nope],
            "CSA entries": csa.valid_entries()[:, :nope],
            "HCA entries": state.layers[3].valid_entries()[:, :nope],
        }
        for what, t in stored.items():
            assert torch.equal(q8(t), t) == qat, f"{what} {'not ' if qat else ''}FP8 round-tripped"
        keys = csa.valid_index_keys()
        assert torch.equal(q4(keys), keys) == qat, "indexer keys"
        assert csa.n_entries == 6 and state.layers[3].n_entries == 3


def test_simulations_move_the_logits_by_the_expected_amount(
    checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    """oracle_notes §1: on tiny random models the simulations move logits by about 0.2 to more than 1."""
    ckpt = checkpoint("tiny-pro", True)
    x = ids(2, 40, seed=6)
    exact = load_model(ckpt, qat_simulation=False)(x)
    simulated = load_model(ckpt, qat_simulation=True)(x)
    diff = (simulated - exact).abs()
    assert 0.05 < diff.max().item() < 5.0
    assert diff[:, 0].max() > 1e-3  # the window K=V round trip acts from the first token on
    assert (simulated.argmax(-1) == exact.argmax(-1)).float().mean() > 0.5  # a perturbation, not a different model
