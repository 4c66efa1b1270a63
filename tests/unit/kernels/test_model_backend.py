"""The whole model with the `cuda` backend (Triton interpreter on CPU, fp32) gives the reference backend's logits.

Every op of the model goes through the registry, so with DSV4_KERNEL_BACKEND=cuda a forward pass runs only
Triton kernels for them; a missing cuda op would raise KernelBackendError here. Tiny shapes and few tokens keep
the interpreter under a minute: 20 tokens overflow the 16-token window and give the CSA layer more compressed
entries (5) than its top-k (4), and the HCA layer (m = 8) two entries; decode rows at positions 13 and 18 have
fewer compressed entries than top-k and a partly filled window ring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.kernels.registry import lookup
from dsv4.model_runtime import load_model
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import SequenceState

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, device: torch.device) -> DeepseekV4:
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny-flash") / "ckpt", "tiny-flash", quantized=True, seed=0)
    return load_model(Path(folder), device=device, dtype=torch.float32, qat_simulation=False)


def _decode_steps(model: DeepseekV4, states: list[SequenceState], ids: torch.Tensor) -> list[torch.Tensor]:
    return [model.decode(ids[:, t], states) for t in range(ids.shape[1])]


def test_cuda_backend_logits_match_reference(model: DeepseekV4, device: torch.device) -> None:
    """Full-sequence logits of one row, and 2 decode steps of two rows (S = 1, ragged: they start at different
    positions)."""
    ids = torch.randint(2, 129280, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    model.bind_ops("reference")
    want_full = model(ids[:1])
    prefix = [ids[:1, :18], ids[1:, :13]]
    states: dict[str, list[SequenceState]] = {}
    for backend in ("reference", "cuda"):  # the same prefix states, prefilled by the reference
        states[backend] = [model.new_state(), model.new_state()]
        for row, p in enumerate(prefix):
            model.prefill(p, [states[backend][row]])
    steps = ids[:, 18:20]
    want_steps = _decode_steps(model, states["reference"], steps)

    model.bind_ops("cuda")
    assert lookup("sparse_attention", model.ops.backend).__module__ == "dsv4.kernels.cuda.attention"
    got_full = model(ids[:1])
    got_steps = _decode_steps(model, states["cuda"], steps)
    torch.testing.assert_close(got_full, want_full, atol=2e-4, rtol=1e-4)
    assert bool((got_full.argmax(-1) == want_full.argmax(-1)).all())
    for got, want in zip(got_steps, want_steps, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
