"""The MTP module `mtp.0`: loaded from the official names, incremental equals full."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4.model_runtime import load_model
from dsv4.model_runtime.formats import dequant_fp8

pytestmark = pytest.mark.unit


def test_mtp_weights_come_from_the_mtp_tensors(checkpoint: Callable[[str, bool], Path]) -> None:
    ckpt = checkpoint("tiny-pro", True)
    model = load_model(ckpt, qat_simulation=False)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(str(ckpt / index["mtp.0.e_proj.weight"]))
    e_proj = model.mtp[0].e_proj
    assert torch.equal(e_proj.weight.view(torch.uint8), shard["mtp.0.e_proj.weight"].view(torch.uint8))  # packed
    w = dequant_fp8(shard["mtp.0.e_proj.weight"], shard["mtp.0.e_proj.scale"])
    assert torch.equal(e_proj(torch.eye(w.shape[1])), w.T)
    assert torch.equal(model.mtp[0].hc_head.fn, shard["mtp.0.hc_head_fn"])
    assert model.mtp[0].attn.compressor is None  # the MTP block is a sliding-window layer
    assert not load_model(ckpt, mtp=False).mtp


def test_mtp_incremental_equals_full(checkpoint: Callable[[str, bool], Path], ids: Callable[..., torch.Tensor]) -> None:
    model = load_model(checkpoint("tiny-flash", True), qat_simulation=False)
    x = ids(2, 30, seed=7)
    st = [model.new_state() for _ in range(2)]
    streams = model.hidden_streams(x[:, :-1], st)
    full = model.mtp_logits(streams, x[:, 1:], st)  # [B, 29, V]: predictions for tokens 2..30
    assert full.shape == (2, 29, model.cfg.vocab_size) and st[0].mtp_position == 29
    # One position at a time, as speculative decoding runs it: main step at t, then MTP with token t+1.
    st = [model.new_state() for _ in range(2)]
    for t in range(29):
        s = model.hidden_streams(x[:, t : t + 1], st)
        step = model.mtp_logits(s, x[:, t + 1 : t + 2], st)
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-4, f"position {t}"
    # The MTP prediction differs from the main model's next-token logits (it predicts one further ahead).
    main = model(x)[:, :-1]
    assert (main - full).abs().max() > 0.1
