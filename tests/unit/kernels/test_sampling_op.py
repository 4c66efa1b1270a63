"""The registry's sampling ops: filter_logits and sample_tokens (reference; the cuda/ascend backends run it too)."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import ops
from dsv4.kernels.registry import lookup

pytestmark = pytest.mark.unit
REF = ops.bind("cpu", "reference")

INF = float("-inf")


def _params(rows: list[tuple[float, int, float, float]]) -> tuple[torch.Tensor, ...]:
    t, k, p, m = zip(*rows, strict=True)
    return (
        torch.tensor(t, dtype=torch.float64),
        torch.tensor(k, dtype=torch.long),
        torch.tensor(p, dtype=torch.float64),
        torch.tensor(m, dtype=torch.float64),
    )


def test_filters_keep_exactly_the_allowed_tokens() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]] * 4)
    probs = torch.softmax(logits[0].double(), -1)
    mass_two = float(probs[0] + probs[1]) - 1e-9
    out = REF.filter_logits(
        logits, *_params([(1.0, 2, 1.0, 0.0), (1.0, 0, mass_two, 0.0), (1.0, 0, 1.0, 0.5), (2.0, 0, 1.0, 0.0)])
    )
    kept = (out > INF).tolist()
    assert kept[0] == [True, True, True, False, False]  # top-k keeps ties with the k-th value
    assert kept[1] == [True, True, False, False, False]  # smallest prefix (stable order) reaching top_p
    assert kept[2] == (probs >= 0.5 * probs.max()).tolist()
    assert torch.equal(out[3], logits[3].double() / 2.0)
    assert out.dtype == torch.float64


def test_rows_never_influence_each_other() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    rows = [
        (0.0, 0, 1.0, 0.0),
        (0.7, 5, 1.0, 0.0),
        (1.3, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.1),
        (2.0, 7, 0.9, 0.05),
        (1.0, 0, 1.0, 0.0),
    ]
    noise = -torch.log(-torch.log(torch.rand(6, 50, dtype=torch.float64)))
    batched = REF.sample_tokens(logits, *_params(rows), noise)
    for i, row in enumerate(rows):
        alone = REF.sample_tokens(logits[i : i + 1], *_params([row]), noise[i : i + 1])
        assert int(alone[0]) == int(batched[i])
    assert int(batched[0]) == int(logits[0].argmax())  # temperature 0 is greedy, whatever the noise


def test_draws_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -9.0]).expand(20000, 5)
    params = _params([(1.0, 4, 1.0, 0.0)] * 20000)
    gen = torch.Generator().manual_seed(1)
    noise = -torch.log(-torch.log(torch.rand(20000, 5, dtype=torch.float64, generator=gen)))
    counts = torch.bincount(REF.sample_tokens(logits, *params, noise), minlength=5).double() / 20000
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0, 0.5]).double(), -1)
    assert counts[4] == 0  # outside the top 4
    assert torch.allclose(counts[:4], expected, atol=0.015)


def test_every_backend_registers_the_sampling_ops() -> None:
    for backend in ("reference", "cuda"):
        assert callable(lookup("sample_tokens", backend)) and callable(lookup("filter_logits", backend))
