"""The decode-shaped grouped GEMV (kernels/cuda/grouped_gemv.py) vs the reference grouped matmuls (fp32).

Direct calls cover every rows-per-program value, split and unsplit K, partial output and K tiles, empty experts,
E8M0 and F32 FP8 scales; the dispatch cases check that the registered ops take the GEMV at decode row counts.
The weights are only decoded in the kernel, which is exact under the interpreter; bf16 is `gpu`-marked
(test_gpu_numerics.py).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.cuda import grouped_gemv as gg
from dsv4.kernels.cuda.launch import tile_schedule
from dsv4.model_runtime.formats import quant_fp4, quant_fp8

pytestmark = pytest.mark.unit

_QUANT = {"fp8": (gg._FP8, quant_fp8), "mxfp4": (gg._MXFP4, quant_fp4)}


def _experts(fmt: str, e: int, o: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_QUANT[fmt][1](torch.randn(o, k) * 0.05) for _ in range(e)]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


def _ends(counts: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def test_rows_per_program_threshold():
    assert gg.gemv_rows(6, 256) == 1  # Flash batch 1: 6 experts x 1 row
    assert gg.gemv_rows(384, 256) == 2  # batch 64: 1.5 rows per expert on average
    assert gg.gemv_rows(8, 8) == 1  # wo_a's 8 groups at batch 1
    assert gg.gemv_rows(32, 8) == 4
    assert gg.gemv_rows(512, 8) is None  # wo_a at batch 64: the tiled MMA kernel
    assert gg.gemv_rows(0, 8) is None


@pytest.mark.parametrize("counts", [[6], [1, 0, 4, 0, 2], [0, 0, 3], [0, 0], [4, 4]])
@pytest.mark.parametrize("block_m", [1, 2, 4, 16])
@pytest.mark.parametrize("tail", [0, 1, 5, 33])
def test_tile_schedule_covers_every_row_once_within_its_bound(counts, block_m, tail):
    """Live tiles cover each expert's rows, spare tiles the `tail` rows past the last end (the kernels store those
    rows' zeros from them): every row once, in order."""
    ends = _ends(counts, torch.device("cpu"))
    rows = sum(counts) + tail
    expert, first, n = tile_schedule(ends, rows, block_m)
    assert n == -(-rows // block_m) + min(len(counts), rows)
    covered = []
    for e, f in zip(expert.tolist(), first.tolist(), strict=True):
        end = int(ends[e]) if e < len(counts) else rows
        covered += [r for r in range(f, f + block_m) if r < end]
    assert covered == list(range(rows))


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize(
    ("counts", "o", "k", "rows"),
    [
        ([1, 0, 2, 1], 40, 320, 1),  # partial output tile, K not a whole step
        ([3, 0, 5], 130, 512, 2),  # partial 128-row scale block, several row tiles per expert
        ([1, 1, 1], 64, 1024, 4),  # few programs: K split, partials summed
        ([2], 256, 1024, 1),
    ],
    ids=["partial", "ragged", "split-k", "one-expert"],
)
def test_gemv_matches_reference(impls, device, fmt, counts, o, k, rows):
    ref, _ = impls(f"grouped_matmul_{fmt}")
    torch.manual_seed(7)
    w, s = _experts(fmt, len(counts), o, k, device)
    x, ends = torch.randn(sum(counts), k, device=device), _ends(counts, device)
    got = gg.grouped_gemv(x, w, s, ends, _QUANT[fmt][0], rows)
    torch.testing.assert_close(got, ref(x, w, s, ends), atol=1e-4, rtol=1e-5)


def test_gemv_fp8_with_f32_scales(impls, device):
    ref, _ = impls("grouped_matmul_fp8")
    torch.manual_seed(8)
    w, s = _experts("fp8", 2, 136, 264, device)
    s = s.float() * 1.3  # not powers of two
    x, ends = torch.randn(3, 264, device=device), _ends([1, 2], device)
    got = gg.grouped_gemv(x, w, s, ends, gg._FP8, 2)
    torch.testing.assert_close(got, ref(x, w, s, ends), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_flash_decode_shape_through_the_registered_op(impls, device, monkeypatch, fmt):
    """Flash batch 1: 6 of 256 routed experts with one row each at hidden 4096 (a 128-row slice of the expert's
    outputs keeps the interpreter fast); the registered op must take the GEMV."""
    ref, cuda = impls(f"grouped_matmul_{fmt}")
    torch.manual_seed(9)
    w6, s6 = _experts(fmt, 6, 128, 4096, device)
    slots = torch.tensor([3, 40, 41, 100, 200, 255])
    w = torch.zeros(256, *w6.shape[1:], dtype=torch.uint8, device=device)
    s = torch.zeros(256, *s6.shape[1:], dtype=torch.uint8, device=device)
    w[slots], s[slots] = w6.view(torch.uint8), s6.view(torch.uint8)
    w, s = w.view(w6.dtype), s.view(s6.dtype)
    counts = [0] * 256
    for e in slots.tolist():
        counts[e] = 1
    x, ends = torch.randn(6, 4096, device=device), _ends(counts, device)
    calls = []
    real = gg.grouped_gemv
    monkeypatch.setattr("dsv4.kernels.cuda.moe.grouped_gemv", lambda *a: calls.append(a[-1]) or real(*a))
    # the reference over the 6 used experts alone (dequantizing all 256 would take gigabytes)
    want = ref(x, w6, s6, _ends([1] * 6, device))
    torch.testing.assert_close(cuda(x, w, s, ends), want, atol=1e-4, rtol=1e-5)
    assert calls == [1]
