"""The whole model on the `ascend` backend, torch_npu replaced by the schema-checked emulations, in bf16 (the
dtype the NPU ops take) gives the reference backend's logits. NOT a run on Ascend hardware: it shows that every
op of the model reaches an adapter and every torch_npu call the model makes is valid for the 2.14.0 schemas.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from dsv4.kernels.registry import ENV_BACKEND, lookup
from dsv4.model_runtime import load_model
from dsv4.model_runtime.make_checkpoint import write_checkpoint

pytestmark = pytest.mark.unit


def test_model_logits_on_emulated_ascend(npu_ops, tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "ckpt", "tiny-flash", quantized=True, seed=0)
    model = load_model(folder, dtype=torch.bfloat16)
    ids = torch.randint(2, 129280, (2, 20), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(ENV_BACKEND, "reference")
    want = model(ids)
    noise = (want - load_model(folder, dtype=torch.float32)(ids)).abs().mean()  # the reference's own bf16 error
    # a module named torch_npu (as vllm-ascend's CPU tests do) that forwards to the checked namespace
    fake = types.ModuleType("torch_npu")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)

    def op(name: str) -> object:
        if name.startswith("__"):  # module machinery (__file__, __path__) is not an op
            raise AttributeError(name)
        return npu_ops.__getattr__(name)

    fake.__getattr__ = op  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setenv(ENV_BACKEND, "ascend")
    model.bind_ops()
    assert model.ops.backend == "ascend"
    assert lookup("sparse_attention", "ascend").__module__ == "dsv4.kernels.ascend.adapters"
    got = model(ids)
    called = {name for name, _ in npu_ops.calls}
    assert called >= {
        "npu_rms_norm",
        "npu_rotary_mul",
        "npu_mhc_pre",
        "npu_mhc_sinkhorn",
        "npu_mhc_post",
        "npu_grouped_matmul",
        "npu_lightning_indexer",
        "npu_sparse_flash_attention",
        "npu_moe_gating_top_k",
    }
    # bf16 rounding points differ between the emulated ops and the reference: the deviation must stay at the
    # level of the reference's own bf16-vs-fp32 error
    assert (got - want).abs().mean() <= 2 * noise, ((got - want).abs().mean(), noise)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
