"""The decoder runs every boundary between two sub-layers as one fused mHC op (`mhc_post_pre`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime import load_model

pytestmark = pytest.mark.unit

MHC_OPS = ("mhc_pre", "mhc_post", "mhc_post_pre", "hc_head")


def test_each_sublayer_boundary_is_one_fused_op(
    checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]
) -> None:
    """L layers have 2L - 1 boundaries (attention -> MoE, MoE -> next attention); only the first pre-mapping and
    the last post-mapping run alone, so a backend's fused kernel covers all the others."""
    model = load_model(checkpoint("tiny-flash", True), qat_simulation=False, dtype=torch.float32)
    calls: Counter[str] = Counter()
    fns = model.head.ops._fns  # the one Ops every layer of the model shares

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls[name] += 1
            return fn(*args)

        return call

    for name in MHC_OPS:
        fns[name] = counting(name, fns[name])
    layers = model.cfg.num_hidden_layers
    model.prefill(ids(2, 5), [model.new_state(), model.new_state()], last_only=True)
    assert calls == {"mhc_pre": 1, "mhc_post_pre": 2 * layers - 1, "mhc_post": 1, "hc_head": 1}
