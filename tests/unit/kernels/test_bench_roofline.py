"""The CPU-testable part of bench/kernels_gpu.py: roofline arithmetic, the JSON record, and that its cases cover
every `cuda` op with argument shapes the reference accepts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dsv4.kernels.registry import lookup, registered

pytestmark = pytest.mark.unit
BENCH = Path(__file__).resolve().parents[3] / "bench" / "kernels_gpu.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kernels_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_roofline_is_the_slower_of_bytes_and_flops(bench):
    assert bench.roofline_ms(4.8e9, 1.0, 4.8e12, 1e15) == pytest.approx(1.0)  # bandwidth-bound: 1 ms
    assert bench.roofline_ms(1.0, 2e12, 4.8e12, 1e15) == pytest.approx(2.0)  # compute-bound: 2 ms
    with pytest.raises(ValueError):
        bench.roofline_ms(1.0, 1.0, 0.0, 1.0)


def test_record_fractions(bench):
    case = bench.Case("rms_norm", "x", (), bytes=4.8e9, flops=0.0)
    line = bench.record(case, triton_ms=2.0, reference_ms=6.0, measured_bw=2.4e12, measured_flops=1e15)
    assert line["roofline_ms_datasheet"] == pytest.approx(1.0)
    assert line["roofline_fraction_datasheet"] == pytest.approx(0.5)
    assert line["roofline_ms_measured"] == pytest.approx(2.0)
    assert line["roofline_fraction_measured"] == pytest.approx(1.0)
    assert line["speedup_vs_reference"] == pytest.approx(3.0)
    assert line["achieved_gbps"] == pytest.approx(2400.0)


def test_cases_cover_every_cuda_op_and_run_on_the_reference(bench):
    dims = bench.Dims(
        t=2,
        d=64,
        h=4,
        c=32,
        rd=8,
        n_keys=16,
        k=8,
        e_idx=16,
        hi=4,
        ic=16,
        topk=4,
        blocks=2,
        experts=2,
        inter=128,
        rows_per_expert=2,
    )
    cases = bench.cases(torch.device("cpu"), dims)
    assert {c.op for c in cases} == set(registered("cuda"))
    for case in cases:
        assert case.bytes > 0 and case.flops > 0
        out = lookup(case.op, "reference")(*case.args)
        outs = out if isinstance(out, tuple) else (out,)
        if case.op == "filter_logits":  # excluded tokens are -inf by contract
            outs = tuple(o[o != float("-inf")] for o in outs)
        assert all(bool(torch.isfinite(o.float()).all()) for o in outs)


def test_decode_cases_run_on_the_reference(bench):
    """Issue #17's decode cases at tiny widths (the shapes and routing logic; the GPU run uses Flash's)."""
    dims = bench.Dims(
        t=3, d=64, h=4, c=32, inter=32, vocab=300, routed_experts=16, o_lora=32, decode_top_k=5, hca_ratio=8
    )
    cases = bench.decode_cases(torch.device("cpu"), dims)
    assert {c.op for c in cases} == {
        "grouped_matmul_fp8",
        "grouped_matmul_mxfp4",
        "sample_tokens",
        "sample_tokens_seeded",
        "filter_logits",
        "mhc_pre",
        "hc_head",
        "mhc_post_pre",
        "compress_pool_slots",
    }
    assert {c.name.split("-")[1][:2] for c in cases} == {"b1", "b3"}  # batch 1 and dims.t
    for case in cases:
        assert case.bytes > 0 and case.flops > 0
        out = lookup(case.op, "reference")(*case.args)
        outs = out if isinstance(out, tuple) else (out,)
        if case.op == "filter_logits":
            outs = tuple(o[o != float("-inf")] for o in outs)
        assert all(bool(torch.isfinite(o.float()).all()) for o in outs)
    routed = [c for c in cases if "routed" in c.name]
    assert routed and not any(c.time_reference for c in routed)
    # the tl.dot_scaled candidate beside the MXFP4 GEMV, on the same inputs, at both batches
    scaled = [c for c in routed if c.candidate is not None]
    assert [c.name.split("-")[1] for c in scaled] == ["b1", "b3"]
    assert all(c.op == "grouped_matmul_mxfp4" and c.name.endswith("-dot_scaled") for c in scaled)
    from dsv4.kernels.cuda.grouped_scaled import grouped_matmul_mxfp4_scaled

    assert {bench._candidate(c.candidate) for c in scaled} == {grouped_matmul_mxfp4_scaled}
    # the fused mHC boundary beside the two kernels it replaces, on the same inputs, at both batches
    fused = {c.name: c for c in cases if c.op == "mhc_post_pre"}
    assert sorted(fused) == ["decode-b1n4d64", "decode-b1n4d64-unfused", "decode-b3n4d64", "decode-b3n4d64-unfused"]
    for name in ("decode-b1n4d64", "decode-b3n4d64"):
        unfused = bench._candidate(fused[f"{name}-unfused"].candidate)
        assert fused[name].candidate is None and fused[f"{name}-unfused"].args is fused[name].args
        assert unfused is bench.unfused_mhc_post_pre
        # the Triton kernels, interpreted: in fp32 (the interpreter's bf16 is wrong, see test_interpreter_canary)
        args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in fused[name].args)
        want = lookup("mhc_post_pre", "reference")(*args)
        for got, w in zip(unfused(*args), want, strict=True):
            torch.testing.assert_close(got, w, atol=2e-5, rtol=1e-4)


def test_record_without_a_reference_time(bench):
    case = bench.Case("grouped_matmul_mxfp4", "x", (), bytes=4.8e9, flops=1.0, time_reference=False)
    line = bench.record(case, triton_ms=2.0, reference_ms=None, measured_bw=4.8e12, measured_flops=1e15)
    assert line["reference_ms"] is None and line["speedup_vs_reference"] is None
    assert line["roofline_fraction_datasheet"] == pytest.approx(0.5)
