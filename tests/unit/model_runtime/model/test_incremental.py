"""Incremental decoding over explicit per-sequence states equals the full forward at every position."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime import load_model
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

pytestmark = pytest.mark.unit

LENGTH = 40  # past the 16-token window, 10 CSA and 5 HCA blocks
# With QAT the model is discontinuous (oracle_notes §7): in fp32, batched and one-row matmuls round differently
# and a value within ~1e-7 of an FP8 rounding boundary flips a whole step (logits move ~3e-3). In float64 the
# paths differ by ~1e-16 before the fp32 quantizers, so no flip happens and the comparison stays exact-ish.
DTYPE = {False: torch.float32, True: torch.float64}
TOL = {False: 1e-4, True: 1e-6}


def _check_every_prefix(model: DeepseekV4, x: torch.Tensor, tol: float) -> None:
    """For every P in 1..T-1: prefill P tokens, then decode one token at a time to T; all rows batched."""
    full = model(x)[0]  # [T, V]
    T = x.shape[1]
    states = [model.new_state() for _ in range(1, T)]
    for p, st in enumerate(states, start=1):
        got = model.prefill(x[:, :p], [st])[0]
        assert (got - full[:p]).abs().max() <= tol, f"prefill of {p} tokens"
    # Batched decode: row i stands at position i + 1 and stops once it reaches T, so rows sit at different positions.
    active = list(range(len(states)))
    while active:
        pos = [states[i].position for i in active]
        logits = model.decode(x[0, pos], [states[i] for i in active])
        for row, (i, p) in enumerate(zip(active, pos, strict=True)):
            err = (logits[row] - full[p]).abs().max()
            assert err <= tol, f"decode at position {p} after a prefill of {i + 1}: {err}"
        active = [i for i in active if states[i].position < T]


@pytest.mark.parametrize("qat", [False, True], ids=["float", "qat"])
@pytest.mark.parametrize("preset", ["tiny-flash", "tiny-pro"])
def test_prefill_then_decode_equals_full_forward(
    preset: str, qat: bool, checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    model = load_model(checkpoint(preset, True), qat_simulation=qat, dtype=DTYPE[qat])
    _check_every_prefix(model, ids(1, LENGTH, seed=2), TOL[qat])


@pytest.mark.parametrize("qat", [False, True], ids=["float", "qat"])
def test_chunked_prefill_equals_full_forward(
    qat: bool, checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    model = load_model(checkpoint("tiny-flash", True), qat_simulation=qat, dtype=DTYPE[qat])
    x = ids(2, LENGTH, seed=3)
    full = model(x)
    for cuts in ([0, 5, 6, 19, 40], [0, 3, 20, 21, 22, 40], [0, 17, 33, 40]):
        states = [model.new_state() for _ in range(2)]
        out = torch.cat([model.prefill(x[:, a:b], states) for a, b in itertools.pairwise(cuts)], dim=1)
        assert (out - full).abs().max() <= TOL[qat], f"chunks {cuts}"
        assert all(st.position == LENGTH for st in states)


def test_batched_rows_do_not_share_state(
    checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    """A row's logits do not depend on the other rows of the batch, nor on a previous sequence."""
    model = load_model(checkpoint("tiny-pro", True), qat_simulation=False)
    x = ids(3, 24, seed=4)
    together = model(x)
    for row in range(3):
        alone = model(x[row : row + 1])
        assert (alone[0] - together[row]).abs().max() <= 1e-4
    # A state used for one sequence then replaced by a fresh one gives the fresh-sequence result (no leak of the
    # compressor's partial blocks: a 3-token prefill does not fill the CSA overlap slots).
    used = model.new_state()
    model.prefill(x[:1, :21], [used])
    fresh = model.new_state()
    got = model.prefill(x[1:2, :3], [fresh])
    for _ in range(12):
        got = model.decode(x[1, fresh.position : fresh.position + 1], [fresh])
    assert (got[0] - together[1, 14]).abs().max() <= 1e-4


def test_decode_rejects_mismatched_batch(checkpoint: Callable[[str, bool], Path]) -> None:
    model = load_model(checkpoint("tiny-flash", False), qat_simulation=False)
    with pytest.raises(ValueError, match="len\\(states\\)"):
        model.prefill(torch.zeros(2, 3, dtype=torch.long), [model.new_state()])
