"""The shared in-register decoders of kernels/cuda/mx.py over every code, against torch's own dtypes (exact)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.mx import e2m1, e4m3, e8m0
from dsv4.kernels.reference.quant_moe import E2M1_VALUES

pytestmark = pytest.mark.unit


def test_every_code_decodes_exactly(device):
    # decorated here, inside the test, where the folder's fixture has set the Triton mode of this machine
    @triton.jit
    def decode_all(codes_ptr, e2m1_ptr, e4m3_ptr, e8m0_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        b = tl.load(codes_ptr + i)
        tl.store(e2m1_ptr + i, e2m1(b.to(tl.int32) & 0xF))
        tl.store(e4m3_ptr + i, e4m3(b))
        tl.store(e8m0_ptr + i, e8m0(b))

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    got_e2m1, got_e4m3, got_e8m0 = (torch.empty(256, device=device) for _ in range(3))
    decode_all[(1,)](codes, got_e2m1, got_e4m3, got_e8m0, N=256)
    want_e2m1 = torch.tensor(E2M1_VALUES).repeat(16)
    torch.testing.assert_close(got_e2m1.cpu(), want_e2m1, atol=0, rtol=0)
    assert torch.equal(got_e2m1.cpu().signbit(), want_e2m1.signbit())  # -0.0 stays negative
    want_e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = ~want_e4m3.isnan()
    torch.testing.assert_close(got_e4m3.cpu()[finite], want_e4m3[finite], atol=0, rtol=0)
    assert got_e4m3.cpu()[~finite].abs().eq(480).all()  # the NaN codes, never stored, decode as +-480
    want_e8m0 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e8m0fnu).float()
    ok = ~want_e8m0.isnan()  # 0xFF is E8M0's NaN
    torch.testing.assert_close(got_e8m0.cpu()[ok], want_e8m0[ok], atol=0, rtol=0)
