"""Why the bf16 / FP8-cast cases are `gpu`-marked: Triton 3.9.0's interpreter still computes them wrongly.

A canary, not a kernel test: it asserts the known interpreter bugs (triton-lang/triton #8322 for the fp32 ->
e4m3 rounding carry; bf16 arithmetic unsupported) are still there. When it fails, the pinned Triton fixed them:
move the affected cases of test_gpu_numerics.py into the CPU suite.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(torch.cuda.is_available(), reason="about Triton's CPU interpreter; a GPU runs compiled"),
]


def test_interpreter_still_miscasts_fp8_and_bf16():
    # decorated here, inside the test, where the folder's fixture has set TRITON_INTERPRET=1
    @triton.jit
    def to_fp8(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y_ptr + o, tl.load(x_ptr + o).to(tl.float8e4nv))

    @triton.jit
    def bf16_double(x_ptr, y_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        a = tl.load(x_ptr + o).to(tl.bfloat16)
        tl.store(y_ptr + o, a + a)

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    fp8 = torch.empty(4096, dtype=torch.float8_e4m3fn)
    to_fp8[(1,)](x, fp8, N=4096)
    wrong_fp8 = int((fp8.float() != x.to(torch.float8_e4m3fn).float()).sum())
    bf16 = torch.empty(4096, dtype=torch.bfloat16)
    bf16_double[(1,)](x, bf16, N=4096)
    wrong_bf16 = int(((bf16.float() - (x.bfloat16() * 2).float()).abs() > 1e-2).sum())
    assert wrong_fp8 > 0 and wrong_bf16 > 0, (
        f"Triton {triton.__version__}'s interpreter now casts correctly (fp8 wrong: {wrong_fp8}, bf16 wrong: "
        f"{wrong_bf16}): run the bf16/FP8 cases on CPU too"
    )
