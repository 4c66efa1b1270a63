"""`routed_experts` over a slice of the experts (one expert-parallel rank's share): the slices' outputs add up to
the whole MoE, and no slice reads a value on the host (the decode step and its graphs run it)."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import ops
from dsv4.model_runtime.layers.moe import routed_experts

from .op_trace import OpTrace

pytestmark = pytest.mark.unit


def test_expert_slices_add_up_to_all_experts_without_a_host_sync():
    torch.manual_seed(0)
    n, k, e, d, inter = 7, 3, 8, 32, 16
    bound = ops.bind(torch.device("cpu"), "reference")
    u = torch.randn(n, d)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    weights = torch.rand(n, k)
    w13, w2 = torch.randn(e, 2 * inter, d) * 0.1, torch.randn(e, d, inter) * 0.1
    whole = routed_experts(bound, u, weights, idx, (w13, None, w2, None), limit=7.0)
    parts = []
    for first in (0, 2, 5):  # uneven slices: [0, 2), [2, 5), [5, 8)
        last = {0: 2, 2: 5, 5: 8}[first]
        with OpTrace() as trace:
            part = routed_experts(bound, u, weights, idx, (w13[first:last], None, w2[first:last], None), 7.0, first)
        assert trace.syncs == [], trace.syncs
        parts.append(part)
    torch.testing.assert_close(sum(parts), whole, atol=1e-5, rtol=1e-5)
    assert not torch.equal(parts[0], torch.zeros_like(parts[0]))
