"""The batched decode step is capturable as a CUDA graph, checked on CPU with a fake CUDA device
(decode_capture_check.py, in a subprocess): after one warm-up step, no op of the step reads a value on the host
(fake tensors raise on it), takes a CPU tensor or makes one, on the reference backend and on the cuda backend (whose
Triton launches are recorded, not run). The CPU tests run the step on CPU tensors, where a CPU tensor made inside
the step or a host read of a small tensor goes unseen until a capture on a GPU refuses it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CUDA_KERNELS = {
    "_compress_pool_slots_kernel",
    "_grouped_gemv_kernel",
    "_hc_head_finish_kernel",
    "_linear_kernel",
    "_mhc_post_kernel",
    "_mhc_pre_finish_kernel",
    "_mix_partial_kernel",
    "_norm_rope_kernel",
    "_paged_attention_kernel",
    "_paged_scores_kernel",
    "_route_kernel",
    "_swiglu_kernel",
    "_topk_kernel",
}


def _check(backend: str, rows: int) -> dict:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("decode_capture_check.py")), backend, str(rows)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_decode_step_on_a_fake_cuda_device_keeps_everything_on_the_device(backend: str, rows: int) -> None:
    got = _check(backend, rows)
    assert got["logits"] == [[rows, 129280], "cuda:0", "torch.float32"]
    assert got["host_tensors"] == []
    if backend == "cuda":  # every op of the step went to a Triton kernel, none to a PyTorch fallback
        assert set(got["kernels"]) == CUDA_KERNELS and got["launches"] > 100
