"""Our runtime against transformers 5.23.0 DeepseekV4ForCausalLM (fp32, same checkpoint, qat_simulation=False)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime import load_model

pytestmark = pytest.mark.unit

TOL = 1e-4
# Tiny presets: window 16, CSA m=4 with top-4, HCA m=8; 48 tokens = 3 windows, 12 CSA and 6 HCA blocks, so top-k
# selection is exercised. Logits are causal, so one 48-token forward checks every prefix length 1..48.
LENGTH = 48


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "fp8-fp4"])
@pytest.mark.parametrize("preset", ["tiny-flash", "tiny-pro"])
def test_logits_match_transformers(
    preset: str,
    quantized: bool,
    checkpoint: Callable[[str, bool], Path],
    oracle: Callable[[Path], Any],
    ids: Callable[..., torch.Tensor],
) -> None:
    ckpt = checkpoint(preset, quantized)
    ours = load_model(ckpt, qat_simulation=False)
    theirs = oracle(ckpt)
    x = ids(3, LENGTH, seed=1)
    got = ours(x)
    with torch.no_grad():
        want = theirs(x, use_cache=False).logits
    assert got.shape == (3, LENGTH, ours.cfg.vocab_size)
    assert want.abs().max() > 1.0  # logits of a working model, not a degenerate all-zero comparison
    diff = (got - want).abs().amax(dim=(0, 2))  # per position
    assert diff.max() <= TOL, f"max |Δlogit| per position: {diff.tolist()}"


@pytest.mark.parametrize("length", [1, 5, 17])
def test_short_and_odd_lengths_match_transformers(
    length: int,
    checkpoint: Callable[[str, bool], Path],
    oracle: Callable[[Path], Any],
    ids: Callable[..., torch.Tensor],
) -> None:
    ckpt = checkpoint("tiny-pro", True)
    x = ids(2, length, seed=length)
    got = load_model(ckpt, qat_simulation=False)(x)
    with torch.no_grad():
        want = oracle(ckpt)(x, use_cache=False).logits
    assert (got - want).abs().max() <= TOL


def test_bf16_model_is_statistically_close_to_fp32(
    checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    """bf16 weights and activations (the official dtype) stay near the fp32 logits; only loose, statistical bounds
    hold because bf16 noise flips routing and top-k choices (oracle_notes §4)."""
    ckpt = checkpoint("tiny-flash", True)
    x = ids(2, 40, seed=8)
    exact = load_model(ckpt, qat_simulation=True)(x)
    half = load_model(ckpt, qat_simulation=True, dtype=torch.bfloat16)(x)
    assert half.dtype == torch.float32  # logits are computed in fp32 from the bf16 hidden state
    assert (half - exact).abs().mean() < 0.1
    assert (half.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_bf16_experts_of_any_width_load_like_transformers(
    tmp_path: Path, oracle: Callable[[Path], Any], ids: Callable[..., torch.Tensor]
) -> None:
    """A BF16 checkpoint whose moe_intermediate_size (72) is not a multiple of 32: its experts are not MXFP4, so no
    block rule applies; it loads and matches transformers (issue #14, item 6)."""
    from dsv4.model_runtime.make_checkpoint import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", overrides={"moe_intermediate_size": 72})
    ours = load_model(ckpt, qat_simulation=False)
    assert ours.layers[0].ffn.w13.shape == (8, 144, 128) and ours.layers[0].ffn.w13_scale is None  # not MXFP4
    x = ids(2, 20, seed=9)
    with torch.no_grad():
        want = oracle(ckpt)(x, use_cache=False).logits
    assert (ours(x) - want).abs().max() <= TOL
