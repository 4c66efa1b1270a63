"""bf16 and quantized-weight cases of the Triton kernels, on the GPU only (bench/gpu.sh runs them).

Triton's interpreter computes bf16 wrongly (silently), so these cannot run on CPU; `make test` deselects the
`gpu` marker. Each case compares with the reference on the same bf16 inputs at bf16 tolerances.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.registry import lookup
from dsv4.model_runtime.formats import quant_fp4, quant_fp8

pytestmark = pytest.mark.gpu
BF16 = {"atol": 3e-2, "rtol": 3e-2}


@pytest.fixture(autouse=True)
def _gpu() -> None:
    """Fail (never skip) when selected by hand on a machine without a GPU."""
    if not torch.cuda.is_available():
        pytest.fail("this case needs an NVIDIA GPU (the Triton interpreter computes bf16 wrongly); bench/gpu.sh")


def _pair(op: str):
    return lookup(op, "reference"), lookup(op, "cuda")


def test_rms_norm_rope_bf16():
    ref, cuda = _pair("rms_norm_rope")
    x = torch.randn(4, 7, 64, 512, device="cuda").bfloat16()
    w = torch.randn(512, device="cuda")
    angles = torch.rand(4, 7, 32, device="cuda") * 6
    torch.testing.assert_close(
        cuda(x, w, 1e-6, angles.cos(), angles.sin()), ref(x, w, 1e-6, angles.cos(), angles.sin()), **BF16
    )


def test_sparse_attention_bf16():
    ref, cuda = _pair("sparse_attention")
    q = torch.randn(4, 1, 64, 512, device="cuda").bfloat16()
    kv = torch.randn(4, 700, 512, device="cuda").bfloat16()
    idx = torch.rand(4, 1, 700).argsort(-1)[..., :640].cuda()  # distinct entries per query
    idx[..., ::7] = -1
    sink = torch.randn(64, device="cuda")
    torch.testing.assert_close(cuda(q, kv, idx, sink, 512**-0.5), ref(q, kv, idx, sink, 512**-0.5), **BF16)


def test_indexer_topk_bf16_picks_entries_of_the_same_scores():
    ref, cuda = _pair("indexer_topk")
    q = torch.randn(2, 3, 64, 128, device="cuda").bfloat16()
    w = (torch.randn(2, 3, 64, device="cuda") * (64 * 128) ** -0.5).bfloat16()
    keys = torch.randn(2, 2000, 128, device="cuda").bfloat16()
    visible = torch.tensor([[2000, 1500, 10], [300, 2000, 0]], device="cuda")
    got, want = cuda(q, w, keys, visible, 512), ref(q, w, keys, visible, 512)
    score = (torch.einsum("bshd,bed->bshe", q.float(), keys.float()).relu() * w.float()[..., None]).sum(2)
    for b in range(2):
        for s in range(3):
            g, r = got[b, s], want[b, s]
            assert int((g < 0).sum()) == int((r < 0).sum())
            gs, rs = score[b, s][g[g >= 0]].sort().values, score[b, s][r[r >= 0]].sort().values
            torch.testing.assert_close(gs, rs, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("quant", ["none", "fp8", "mxfp4"])
def test_grouped_matmul_bf16(quant):
    counts = [0, 37, 1, 300, 5, 0, 64, 2]
    x = torch.randn(sum(counts), 512, device="cuda").bfloat16()
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    master = [torch.randn(256, 512) * 0.05 for _ in counts]
    if quant == "none":
        ref, cuda = _pair("grouped_matmul")
        args: tuple[torch.Tensor, ...] = (torch.stack(master).cuda().bfloat16(),)
    else:
        ref, cuda = _pair(f"grouped_matmul_{quant}")
        pairs = [(quant_fp8 if quant == "fp8" else quant_fp4)(m) for m in master]
        args = (torch.stack([p[0] for p in pairs]).cuda(), torch.stack([p[1] for p in pairs]).cuda())
    torch.testing.assert_close(cuda(x, *args, ends), ref(x, *args, ends), **BF16)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("counts", [[0, 1, 0, 1, 1, 0, 1, 1, 1], [2, 1, 0, 3, 1, 2, 1, 0]], ids=["1-row", "1.5-rows"])
def test_grouped_gemv_bf16_decode_rows(quant, counts):
    """Decode row counts (the grouped GEMV of grouped_gemv.py) at Flash's hidden width, compiled for the GPU."""
    x = torch.randn(sum(counts), 4096, device="cuda").bfloat16()
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    pairs = [(quant_fp8 if quant == "fp8" else quant_fp4)(torch.randn(256, 4096) * 0.05) for _ in counts]
    w, s = torch.stack([p[0] for p in pairs]).cuda(), torch.stack([p[1] for p in pairs]).cuda()
    ref, cuda = _pair(f"grouped_matmul_{quant}")
    torch.testing.assert_close(cuda(x, w, s, ends), ref(x, w, s, ends), **BF16)


@pytest.mark.parametrize(("m", "overlap"), [(128, False), (4, True)], ids=["hca", "csa"])
def test_compress_pool_slots_flash_states(m, overlap):
    """The compiled decode pooling at Flash's head dim over 64 rows' states, a third of them complete."""
    ref, cuda = _pair("compress_pool_slots")
    coff = 2 if overlap else 1
    kv = torch.randn(65, coff * m, coff * 512, device="cuda")
    score = torch.randn(65, coff * m, coff * 512, device="cuda") * 3
    slots, complete = torch.randperm(64, device="cuda"), torch.arange(64, device="cuda") % 3 == 0
    torch.testing.assert_close(
        cuda(kv, score, slots, complete, overlap), ref(kv, score, slots, complete, overlap), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("counts", [[0, 1, 0, 1, 1, 0, 1, 1, 1], [2, 1, 0, 3, 1, 2, 1, 0]], ids=["1-row", "1.5-rows"])
def test_dot_scaled_mxfp4_candidate_bf16(counts):
    """kernels/cuda/grouped_scaled.py compiled (tl.dot_scaled, upcast to bf16 on Hopper) at Flash's expert width."""
    from dsv4.kernels.cuda.grouped_scaled import grouped_matmul_mxfp4_scaled

    ref = lookup("grouped_matmul_mxfp4", "reference")
    pairs = [quant_fp4(torch.randn(256, 4096) * 0.02) for _ in counts]
    w = torch.stack([p[0] for p in pairs]).cuda()
    s = torch.stack([p[1] for p in pairs]).cuda()
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts) + 2, 4096, device="cuda").bfloat16()
    got = grouped_matmul_mxfp4_scaled(x, w, s, ends)
    assert torch.equal(got[sum(counts) :], torch.zeros_like(got[sum(counts) :]))
    torch.testing.assert_close(got[: sum(counts)], ref(x[: sum(counts)], w, s, ends), **BF16)


def test_mhc_pre_post_bf16():
    pre_ref, pre_cuda = _pair("mhc_pre")
    post_ref, post_cuda = _pair("mhc_post")
    streams = torch.randn(64, 4, 4096, device="cuda").bfloat16()
    fn = torch.randn(24, 4 * 4096, device="cuda") * 0.01
    scale, base = torch.randn(3, device="cuda"), torch.randn(24, device="cuda")
    got, want = pre_cuda(streams, fn, scale, base, 20, 1e-6, 1e-6), pre_ref(streams, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **BF16)
    y = torch.randn(64, 4096, device="cuda").bfloat16()
    torch.testing.assert_close(post_cuda(y, streams, want[1], want[2]), post_ref(y, streams, want[1], want[2]), **BF16)


@pytest.mark.parametrize("rows", [1, 64])
def test_mhc_post_pre_bf16(rows):
    ref, cuda = _pair("mhc_post_pre")
    streams, y = torch.randn(rows, 4, 4096, device="cuda").bfloat16(), torch.randn(rows, 4096, device="cuda").bfloat16()
    post, comb = torch.rand(rows, 4, device="cuda") * 2, torch.rand(rows, 4, 4, device="cuda")
    fn = torch.randn(24, 4 * 4096, device="cuda") * 0.01
    scale, base = torch.randn(3, device="cuda"), torch.randn(24, device="cuda")
    got = cuda(y, streams, post, comb, fn, scale, base, 20, 1e-6, 1e-6)
    want = ref(y, streams, post, comb, fn, scale, base, 20, 1e-6, 1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **BF16)


def _paged(codec, values: torch.Tensor, rows_per_block: int):
    """values [B, E, W] as a store in the codec's format, each row's blocks in shuffled order; + block tables."""
    from dsv4.kernels.paged import PagedRows

    b, e, width = values.shape
    tables = torch.randperm(b * e // rows_per_block).view(b, -1).to(torch.int32).cuda()
    flat = (tables.long()[:, :, None] * rows_per_block + torch.arange(rows_per_block, device="cuda")).flatten()
    fields = {f.name: torch.zeros(b * e + 1, f.width, dtype=f.dtype, device="cuda") for f in codec.fields}
    for name, data in codec.encode(values.flatten(0, 1)).items():
        fields[name][flat] = data
    return PagedRows(
        codec.format, tuple(fields[f.name] for f in codec.fields), rows_per_block, width, values.dtype
    ), tables


def test_paged_sparse_attention_bf16_fp8_pages():
    from dsv4.model_runtime.engine.kv_layout import FP8NopeCodec
    from dsv4.model_runtime.qat import q8_nope

    ref, cuda = _pair("paged_sparse_attention")
    entries = q8_nope(torch.randn(4, 2048, 512, device="cuda"), 64).bfloat16()
    rows, tables = _paged(FP8NopeCodec(512, torch.bfloat16, 64), entries, 64)
    q, window = torch.randn(4, 64, 512, device="cuda").bfloat16(), torch.randn(5, 128, 512, device="cuda").bfloat16()
    slots, positions = torch.tensor([3, 0, 1, 2], device="cuda"), torch.tensor([5, 127, 4000, 8191], device="cuda")
    idx = torch.rand(4, 2048, device="cuda").argsort(-1)[:, :512]
    idx[:, ::9] = -1
    sink = torch.randn(64, device="cuda")
    args = (q, window, slots, positions, rows, tables, idx, sink, 512**-0.5)
    torch.testing.assert_close(cuda(*args), ref(*args), **BF16)


def test_paged_indexer_topk_bf16_mxfp4_pages_picks_entries_of_the_same_scores():
    from dsv4.kernels.reference.paged import all_keys
    from dsv4.model_runtime.engine.kv_layout import FP4Codec
    from dsv4.model_runtime.qat import q4_hadamard

    ref, cuda = _pair("paged_indexer_topk")
    keys = q4_hadamard(torch.randn(2, 8192, 128, device="cuda")).bfloat16()
    rows, tables = _paged(FP4Codec(128, torch.bfloat16), keys, 64)
    q = torch.randn(2, 64, 128, device="cuda").bfloat16()
    w = (torch.randn(2, 64, device="cuda") * (64 * 128) ** -0.5).bfloat16()
    visible = torch.tensor([8192, 3000], device="cuda")
    got, want = cuda(q, w, rows, tables, visible, 512), ref(q, w, rows, tables, visible, 512)
    decoded = all_keys(rows, tables).float()
    score = (torch.einsum("bhd,bed->bhe", q.float(), decoded).relu() * w.float()[..., None]).sum(1)
    for b in range(2):
        g, r = got[b], want[b]
        assert int((g < 0).sum()) == int((r < 0).sum()) and g[g >= 0].unique().numel() == int((g >= 0).sum())
        torch.testing.assert_close(score[b, g[g >= 0]].sort().values, score[b, r[r >= 0]].sort().values, **BF16)


@pytest.mark.parametrize("quant", ["fp8", "bf16-to-fp32"])
def test_linear_bf16(quant):
    """The block-scaled FP8 projection in bf16, and a bf16 weight with an fp32 output (head, router, compressors)."""
    ref, cuda = _pair("linear")
    x = torch.randn(37, 1024, device="cuda").bfloat16()
    master = torch.randn(4096, 1024) * 0.05
    if quant == "fp8":
        w, s = quant_fp8(master)
        args: tuple[torch.Tensor | None, ...] = (w.cuda(), s.cuda(), None)
    else:
        args = (master.bfloat16().cuda(), None, torch.float32)
    got, want = cuda(x, *args), ref(x, *args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **BF16)


@pytest.mark.parametrize("top_k", [0, 50, 300])
def test_fused_sampler_bf16_logits_flash_vocabulary(top_k):
    """The fused sampler compiled for the GPU at batch 64 and Flash's vocabulary, bf16 logits (read as fp32, so the
    draw must equal the reference's exactly); top-k 300 takes the bisection path."""
    from dsv4.kernels.reference.sampling import gumbel_noise

    rows, vocab = 64, 129280
    logits = (torch.randn(rows, vocab, device="cuda") * 4).bfloat16()
    temperature = torch.linspace(0.0, 1.5, rows, dtype=torch.float64, device="cuda")  # row 0 greedy
    k = torch.full((rows,), top_k, dtype=torch.int64, device="cuda")
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda")
    noise = gumbel_noise(seeds, torch.zeros(rows, dtype=torch.int64, device="cuda"), vocab)
    ref, cuda = _pair("sample_tokens")
    assert torch.equal(cuda(logits, temperature, k, None, None, noise), ref(logits, temperature, k, None, None, noise))
    s_ref, s_cuda = _pair("sample_tokens_seeded")
    index = torch.full((rows,), 5, dtype=torch.int64, device="cuda")
    assert torch.equal(
        s_cuda(logits, temperature, k, None, None, seeds, index),
        s_ref(logits, temperature, k, None, None, seeds, index),
    )
    f_ref, f_cuda = _pair("filter_logits")
    t = temperature.clamp(min=0.1)
    assert torch.equal(f_cuda(logits, t, k, None, None), f_ref(logits, t, k, None, None))


def test_nucleus_sampler_bf16_logits_flash_vocabulary():
    """The top-p / min-p path compiled for the GPU at batch 64 and Flash's vocabulary: the same draws and filtered
    logits as the reference's sorts (rows mix top-p 0.5-1, min-p 0-0.1, top-k 0 or 50; row 0 greedy)."""
    rows, vocab = 64, 129280
    logits = (torch.randn(rows, vocab, device="cuda") * 4).bfloat16()
    temperature = torch.linspace(0.0, 1.5, rows, dtype=torch.float64, device="cuda")
    top_p = torch.linspace(0.5, 1.0, rows, dtype=torch.float64, device="cuda")
    min_p = torch.linspace(0.0, 0.1, rows, dtype=torch.float64, device="cuda")
    k = torch.where(torch.arange(rows, device="cuda") % 2 == 0, 0, 50)
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda")
    index = torch.full((rows,), 5, dtype=torch.int64, device="cuda")
    s_ref, s_cuda = _pair("sample_tokens_seeded")
    for kk, p, m in ((None, top_p, None), (k, top_p, min_p), (None, None, min_p)):
        assert torch.equal(
            s_cuda(logits, temperature, kk, p, m, seeds, index), s_ref(logits, temperature, kk, p, m, seeds, index)
        )
    f_ref, f_cuda = _pair("filter_logits")
    t = temperature.clamp(min=0.1)
    assert torch.equal(f_cuda(logits, t, k, top_p, min_p), f_ref(logits, t, k, top_p, min_p))
