"""The kernel registry: backend chosen by device, env override, clear errors; reference ops vs definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4.kernels import ops
from dsv4.kernels.registry import ENV_BACKEND, KernelBackendError, backend_for, lookup, register, registered

pytestmark = pytest.mark.unit
REF = ops.bind("cpu", "reference")

OPS = [
    "rms_norm",
    "rope",
    "sinkhorn",
    "mhc_pre",
    "mhc_post",
    "hc_head",
    "compress_pool",
    "indexer_topk",
    "sparse_attention",
    "route",
    "grouped_matmul",
    "swiglu",
]


def test_cpu_tensors_use_the_reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert backend_for(torch.device("cpu")) == "reference"
    assert backend_for(torch.device("cuda", 0)) == "cuda"
    assert backend_for(torch.device("npu", 0)) == "ascend" if hasattr(torch, "npu") else True
    assert set(OPS) <= set(registered("reference"))


def test_every_public_op_has_a_reference_implementation() -> None:
    public = {name for name in dir(ops.Ops) if not name.startswith("_")}
    assert public == set(ops.OP_NAMES)
    assert public <= set(registered("reference")), public - set(registered("reference"))


def test_env_override_selects_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert backend_for(torch.device("cuda", 0)) == "reference"
    monkeypatch.setenv(ENV_BACKEND, "tpu")
    with pytest.raises(KernelBackendError, match=f"{ENV_BACKEND}='tpu' is not a kernel backend"):
        ops.bind("cpu")


def test_missing_device_or_library_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; the error path is for machines without one")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(KernelBackendError, match="kernel backend 'cuda' needs"):
        ops.bind("cpu")
    monkeypatch.setenv(ENV_BACKEND, "ascend")
    # Before the ascend backend is imported the registry refuses it; after (another test injected an emulated
    # torch_npu and loaded the adapters) the adapter's own import of torch_npu refuses. Both are errors, no fallback.
    with pytest.raises(KernelBackendError, match=r"kernel backend 'ascend' (needs|cannot import) torch_npu"):
        ops.bind("cpu")


def test_unknown_device_and_unimplemented_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    with pytest.raises(KernelBackendError, match="no kernel backend for device type 'meta'"):
        ops.bind("meta")
    with pytest.raises(KernelBackendError, match="backend 'reference' has no implementation of op 'no_such_op'"):
        lookup("no_such_op", "reference")
    with pytest.raises(KernelBackendError, match="unknown kernel backend 'rocm'"):
        register("rms_norm", "rocm")


# ---- reference ops against their documented definitions --------------------------------------------------------


def test_rope_inverse_undoes_rope_and_rotates_interleaved_pairs_of_the_last_dims() -> None:
    x = torch.randn(2, 3, 4, 16)
    angle = torch.rand(2, 3, 4) * 6
    cos, sin = angle.cos(), angle.sin()
    y = REF.rope(x, cos, sin)
    assert torch.equal(y[..., :8], x[..., :8])
    z = torch.complex(x[..., 8::2], x[..., 9::2]) * torch.polar(torch.ones_like(angle), angle)[:, :, None]
    assert torch.allclose(y[..., 8::2], z.real, atol=1e-6) and torch.allclose(y[..., 9::2], z.imag, atol=1e-6)
    assert torch.allclose(REF.rope(y, cos, sin, inverse=True), x, atol=1e-6)


def test_sinkhorn_is_doubly_stochastic_and_mhc_post_mixes_transposed() -> None:
    comb = REF.sinkhorn(torch.randn(5, 4, 4), 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(5, 4), atol=1e-5)
    assert torch.allclose(comb.sum(-1), torch.ones(5, 4), atol=1e-2)  # rows: 20 iterations, not converged
    streams, y, post = torch.randn(5, 4, 8), torch.randn(5, 8), torch.rand(5, 4)
    out = REF.mhc_post(y, streams, post, comb)
    k = 2
    want = post[:, k, None] * y + sum(comb[:, j, k, None] * streams[:, j] for j in range(4))
    assert torch.allclose(out[:, k], want, atol=1e-5)


def test_sparse_attention_equals_dense_softmax_with_sink() -> None:
    q, kv, sink = torch.randn(1, 2, 3, 8), torch.randn(1, 6, 8), torch.randn(3)
    idx = torch.tensor([[[0, 2, 5, -1], [-1, -1, -1, -1]]])
    out = REF.sparse_attention(q, kv, idx, sink, 0.5)
    sel = kv[0, [0, 2, 5]]
    s = (q[0, 0] @ sel.T) * 0.5  # [H, 3]
    p = torch.exp(s) / (torch.exp(s).sum(-1, keepdim=True) + torch.exp(sink)[:, None])
    assert torch.allclose(out[0, 0], p @ sel, atol=1e-6)
    assert out[0, 1].eq(0).all()  # no entry: only the sink, output 0
    # Many candidates, few picks: the gathering path gives the same result as the masked dense one.
    padded = torch.cat([kv, torch.randn(1, 14, 8)], dim=1)
    assert torch.allclose(REF.sparse_attention(q, padded, idx, sink, 0.5), out, atol=1e-6)


def test_indexer_topk_masks_invisible_entries() -> None:
    q, w, keys = torch.randn(1, 3, 16, 8), torch.rand(1, 3, 16), torch.randn(1, 5, 8)
    idx = REF.indexer_topk(q, w, keys, torch.tensor([[0, 2, 5]]), 3)
    assert idx[0, 0].eq(-1).all()
    assert sorted(i for i in idx[0, 1].tolist() if i >= 0) == [0, 1] and idx[0, 1].eq(-1).sum() == 1
    score = (F.relu(torch.einsum("hd,ed->he", q[0, 2], keys[0])) * w[0, 2, :, None]).sum(0)
    assert set(idx[0, 2].tolist()) == set(score.topk(3).indices.tolist())


def test_router_and_grouped_experts() -> None:
    logits, bias = torch.randn(4, 8), torch.randn(8)
    weights, idx = REF.route(logits, 2, 1.5, bias=bias)
    scores = F.softplus(logits).sqrt()
    assert torch.equal(idx.sort(-1).values, (scores + bias).topk(2).indices.sort(-1).values)
    assert torch.allclose(weights.sum(-1), torch.full((4,), 1.5))
    hashed = torch.tensor([[1, 3]] * 4)
    weights, idx = REF.route(logits, 2, 1.0, hash_idx=hashed)
    assert torch.equal(idx, hashed) and torch.allclose(weights, scores[:, [1, 3]] / scores[:, [1, 3]].sum(-1, True))
    with pytest.raises(ValueError, match="exactly one"):
        REF.route(logits, 2, 1.0)
    x, w = torch.randn(7, 16), torch.randn(3, 5, 16)
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)
    want = torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T])
    assert torch.allclose(REF.grouped_matmul(x, w, ends), want, atol=1e-5)
    assert torch.allclose(REF.grouped_matmul(x.double(), w.double(), ends), want.double(), atol=1e-5)
    g, u = torch.tensor([[20.0, -1.0]]), torch.tensor([[-30.0, 2.0]])
    assert torch.allclose(REF.swiglu(g, u, 10.0), F.silu(torch.tensor([[10.0, -1.0]])) * torch.tensor([[-10.0, 2.0]]))
