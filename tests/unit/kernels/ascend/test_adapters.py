"""Ascend adapters vs the reference, with torch_npu replaced by schema-checked emulations of its documented ops.

This proves the translation (layouts, argument names and types against the pinned 2.14 schemas, output
selection, index packing, documented dtype constraints) on CPU. It proves nothing about the NPU kernels
themselves: the backend has NOT been run on Ascend hardware.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.ascend import adapters
from dsv4.kernels.registry import KernelBackendError, lookup
from dsv4.model_runtime.formats import quant_fp4, quant_fp8

from .emulation import DocumentedConstraintError

pytestmark = pytest.mark.unit
BF16 = {"atol": 2e-2, "rtol": 2e-2}


def _ref(op: str):
    return lookup(op, "reference")


def _called(npu_ops) -> list[str]:
    return [name for name, _ in npu_ops.calls]


def test_route_hash_through_gating_top_k(npu_ops):
    logits, table = torch.randn(7, 16) * 3, torch.randint(0, 16, (7, 4))
    got, want = adapters.route(logits, 4, 1.5, None, table), _ref("route")(logits, 4, 1.5, None, table)
    torch.testing.assert_close(got[1], table)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    assert _called(npu_ops) == ["npu_moe_gating_top_k"]
    bias = torch.randn(16)
    learned = adapters.route(logits, 4, 1.5, bias, None)
    torch.testing.assert_close(learned[0], _ref("route")(logits, 4, 1.5, bias, None)[0])


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(npu_ops, weighted):
    x = torch.randn(3, 5, 40)
    w = torch.randn(40) if weighted else None
    torch.testing.assert_close(adapters.rms_norm(x, w, 1e-6), _ref("rms_norm")(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert _called(npu_ops) == ["npu_rms_norm"]


@pytest.mark.parametrize("shape", [(2, 3, 4, 24), (2, 3, 24), (1, 2, 2, 3, 16)], ids=["heads", "flat", "two-axes"])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_partial_interleaved(npu_ops, shape, inverse):
    x = torch.randn(shape)
    angles = torch.rand(shape[0], shape[1], 4) * 6
    got = adapters.rope(x, angles.cos(), angles.sin(), inverse)
    torch.testing.assert_close(got, _ref("rope")(x, angles.cos(), angles.sin(), inverse), atol=1e-6, rtol=1e-5)
    assert _called(npu_ops) == ["npu_rotary_mul"]


def test_rms_norm_rope(npu_ops):
    x, w = torch.randn(2, 3, 4, 32), torch.randn(32)
    angles = torch.rand(2, 3, 8)
    got = adapters.rms_norm_rope(x, w, 1e-6, angles.cos(), angles.sin())
    want = _ref("rms_norm_rope")(x, w, 1e-6, angles.cos(), angles.sin())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mhc_pre_and_post_bf16(npu_ops):
    n, d = 4, 64
    streams = torch.randn(6, n, d).bfloat16()
    fn, scale, base = torch.randn((2 + n) * n, n * d) * 0.1, torch.randn(3), torch.randn((2 + n) * n)
    got = adapters.mhc_pre(streams, fn, scale, base, 20, 1e-6, 1e-6)
    want = _ref("mhc_pre")(streams, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **BF16)
    y = torch.randn(6, d).bfloat16()
    torch.testing.assert_close(
        adapters.mhc_post(y, streams, want[1], want[2]), _ref("mhc_post")(y, streams, want[1], want[2]), **BF16
    )
    assert _called(npu_ops) == ["npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post"]


def test_mhc_ops_reject_what_the_npu_rejects(npu_ops):
    """Documented limits the CPU path does not have: fp32 streams, and n outside {4, 6, 8} for Sinkhorn."""
    with pytest.raises(DocumentedConstraintError, match="bf16/fp16"):
        adapters.mhc_pre(torch.randn(2, 4, 8), torch.randn(24, 32), torch.randn(3), torch.randn(24), 20, 1e-6, 1e-6)
    with pytest.raises(DocumentedConstraintError, match="n 4/6/8"):
        adapters.sinkhorn(torch.randn(2, 3, 3), 20, 1e-6)


@pytest.mark.parametrize("counts", [[3, 0, 20, 1], [0, 0], [5]])
def test_grouped_matmul(npu_ops, counts):
    x, w = torch.randn(sum(counts), 40), torch.randn(len(counts), 24, 40)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = adapters.grouped_matmul(x, w, ends)
    torch.testing.assert_close(got, _ref("grouped_matmul")(x, w, ends), atol=1e-4, rtol=1e-5)
    assert _called(npu_ops) == (["npu_grouped_matmul"] if sum(counts) else [])


def test_grouped_matmul_quantized(npu_ops):
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)
    x = torch.randn(7, 128)
    q8 = [quant_fp8(torch.randn(64, 128) * 0.05) for _ in range(3)]
    w8, s8 = torch.stack([p[0] for p in q8]), torch.stack([p[1] for p in q8])
    torch.testing.assert_close(
        adapters.grouped_matmul_fp8(x, w8, s8, ends), _ref("grouped_matmul_fp8")(x, w8, s8, ends), atol=1e-4, rtol=0
    )
    q4 = [quant_fp4(torch.randn(64, 128) * 0.05) for _ in range(3)]
    w4, s4 = torch.stack([p[0] for p in q4]), torch.stack([p[1] for p in q4])
    torch.testing.assert_close(
        adapters.grouped_matmul_mxfp4(x, w4, s4, ends), _ref("grouped_matmul_mxfp4")(x, w4, s4, ends), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(("s", "e", "topk", "visible"), [(1, 40, 8, [[40], [3]]), (3, 5, 8, [[0, 2, 5], [1, 5, 4]])])
def test_indexer_topk_bf16(npu_ops, s, e, topk, visible):
    torch.manual_seed(0)
    q, keys = torch.randn(2, s, 16, 32).bfloat16(), torch.randn(2, e, 32).bfloat16()
    w = (torch.randn(2, s, 16) * 0.05).bfloat16()
    vis = torch.tensor(visible)
    got, want = adapters.indexer_topk(q, w, keys, vis, topk), _ref("indexer_topk")(q, w, keys, vis, topk)
    assert got.shape == want.shape == (2, s, min(topk, e))
    assert torch.equal((got < 0).sum(-1), (want < 0).sum(-1))
    assert bool((got < vis[..., None]).all())
    score = (torch.einsum("bshd,bed->bshe", q.float(), keys.float()).relu() * w.float()[..., None]).sum(2)
    for b in range(2):
        for i in range(s):
            g, r = got[b, i], want[b, i]
            gs, rs = score[b, i][g[g >= 0]].sort().values, score[b, i][r[r >= 0]].sort().values
            torch.testing.assert_close(gs, rs, atol=3e-2, rtol=3e-2)


def test_sparse_attention_bf16_packs_valid_indices_first(npu_ops):
    torch.manual_seed(1)
    q, kv = torch.randn(2, 3, 4, 32).bfloat16(), torch.randn(2, 9, 32).bfloat16()
    distinct = torch.rand(2, 3, 12).argsort(-1)  # distinct entries per query, as the model builds them
    idx = torch.where((torch.rand(2, 3, 12) < 0.4) | (distinct >= 9), -1, distinct)
    idx[0, 0] = -1
    sink = torch.randn(4)
    got = adapters.sparse_attention(q, kv, idx, sink, 32**-0.5)
    torch.testing.assert_close(got, _ref("sparse_attention")(q, kv, idx, sink, 32**-0.5), **BF16)
    assert bool((got[0, 0] == 0).all())
    ((name, bound),) = npu_ops.calls
    assert name == "npu_sparse_flash_attention" and bound["sparse_indices"].dtype == torch.int32


def test_ascend_backend_needs_torch_npu(monkeypatch):
    monkeypatch.setenv("DSV4_KERNEL_BACKEND", "ascend")
    from dsv4.kernels import ops

    with pytest.raises(KernelBackendError, match="torch_npu"):
        ops.bind("cpu")
