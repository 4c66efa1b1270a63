"""How ops reach the `cuda` backend: complete, explicit, and never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsv4.kernels.cuda.launch import INTERPRETED, check_device
from dsv4.kernels.registry import KernelBackendError, registered

pytestmark = pytest.mark.unit


def test_cuda_backend_implements_every_reference_op():
    assert set(registered("reference")) <= set(registered("cuda"))


def test_a_tensor_on_the_wrong_device_is_an_error():
    wrong = torch.empty(2, device="meta")
    with pytest.raises(KernelBackendError, match=r"needs (cpu|cuda) tensors, got a meta tensor"):
        check_device("rms_norm", torch.empty(2, device="cpu" if INTERPRETED else "cuda"), wrong)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; a GPU machine has the device")
def test_cuda_backend_on_cpu_without_the_interpreter_raises():
    """DSV4_KERNEL_BACKEND=cuda alone on a machine without a GPU: a clear error, no fallback to the reference."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DSV4_KERNEL_BACKEND": "cuda"}
    code = (
        "import torch\nfrom dsv4.kernels import ops\nfrom dsv4.kernels.registry import KernelBackendError\n"
        "try:\n    ops.bind('cpu')\nexcept KernelBackendError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs a CUDA device (or TRITON_INTERPRET=1)" in out.stdout
