"""The batched decode step is capturable as a CUDA graph, checked on CPU with a fake CUDA device
(decode_capture_check.py, in a subprocess): after one warm-up step, no op of the step, nor of the sampling call
after it, nor of the two parts of an MTP verification step, reads a value on the host (fake tensors raise on it),
takes a CPU tensor or makes one, on the reference backend and on the cuda backend (whose Triton launches are
recorded, not run), in one process and as rank 0 of tensor-, expert- and data-parallel layouts over a fake process
group. The CPU tests run the step on CPU tensors,
where a CPU tensor made inside the step or a host read of a small tensor goes unseen until a capture on a GPU
refuses it."""

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
    "_mhc_post_mix_kernel",
    "_mhc_pre_finish_kernel",
    "_mix_partial_kernel",
    "_norm_rope_kernel",
    "_paged_attention_kernel",
    "_paged_scores_kernel",
    "_route_kernel",
    "_swiglu_kernel",
    "_topk_kernel",
}

# temperature + top-k + top-p + min-p, seeded: the fused top-k scan and pick, then the nucleus radix select
SAMPLE_KERNELS = {
    "_scan_kernel",
    "_pick_kernel",
    "_stats_kernel",
    "_radix_kernel",
    "_keep_kernel",
    "_argmax_chunks_kernel",
}


def _check(backend: str, rows: int, layout: str | None) -> dict:
    args = [backend, str(rows), *([layout] if layout else [])]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("decode_capture_check.py")), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("backend", "rows", "layout"),
    [
        ("reference", 3, None),
        ("cuda", 1, None),
        ("cuda", 3, None),
        ("reference", 3, "2,2,2"),  # rank 0 of TP2 x EP2
        ("cuda", 3, "2,2,2"),
        ("reference", 1, "4,2,4"),  # rank 0 of TP2 x DP2 x EP4, padded to the groups' bucket
        ("cuda", 3, "4,2,4"),
    ],
)
def test_decode_step_on_a_fake_cuda_device_keeps_everything_on_the_device(
    backend: str, rows: int, layout: str | None
) -> None:
    got = _check(backend, rows, layout)
    assert got["logits"] == [[rows, 129280], "cuda:0", "torch.float32"]
    assert got["host_tensors"] == []
    # the MTP verification step's two graphs, under data-parallel attention too
    assert got["verify_logits"] == [[rows, 2, 129280], "cuda:0"] and got["drafts"] == [[rows], "cuda:0"]
    assert got["verify_host_tensors"] == []
    if backend == "cuda":  # 2 tokens a row: over the groups' rows the MoE may take its tiled kernel instead
        moe = {"_grouped_gemv_kernel", "_grouped_matmul_kernel"}
        verify = set(got["verify_kernels"])
        assert CUDA_KERNELS - moe <= verify <= CUDA_KERNELS | moe and verify & moe
    # the sampling call after it (every stage, penalties from the device table, logprobs): still no host read
    assert got["sampled"] == [[rows, 8], "cuda:0"] and got["sample_host_tensors"] == []
    if backend == "cuda":
        assert set(got["sample_kernels"]) == SAMPLE_KERNELS
    if backend == "cuda":  # each kernel op of the step launched its Triton kernel (the MoE's tiled one at more rows)
        assert CUDA_KERNELS <= set(got["kernels"]) <= CUDA_KERNELS | {"_grouped_matmul_kernel"}
        assert got["launches"] > 100
