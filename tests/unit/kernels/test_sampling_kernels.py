"""The fused Triton sampler, its seeded variant and the top-k filter (kernels/cuda/sampling.py) vs the reference
ops (fp32 logits).

Tokens and filtered logits must be equal, not close: the kernels divide and add in fp64 like the reference and
break ties to the lowest token id. Small chunks make a small vocabulary span many scan programs; each path of the
pick kernel is reached: block maxima (k <= KMAX), more than KMAX blocks tied at the bound, k > KMAX (bisection),
no top-k, greedy rows. bf16 logits are `gpu`-marked (test_gpu_numerics.py).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dsv4.kernels import ops
from dsv4.kernels.cuda import sampling as cuda_sampling
from dsv4.kernels.reference import sampling as ref_sampling
from dsv4.kernels.reference.sampling import gumbel_noise

pytestmark = pytest.mark.unit


def _noise(rows: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The engine's seeded Gumbel noise (one request per row, token index 3)."""
    seeds = torch.arange(seed, seed + rows, dtype=torch.int64)
    return gumbel_noise(seeds, torch.full((rows,), 3, dtype=torch.int64), vocab).to(device)


def _rows(device: torch.device, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(8, vocab) * 3
    logits[1, 100:160] = 30.0  # 60 tokens tie at the top: top-k 40 keeps all of them
    logits[5, ::7] = float("-inf")
    logits[6] = 0.5  # every token ties: more blocks than KMAX pass the bound when the vocabulary is large
    temperature = torch.tensor([0.7, 1.0, 0.0, 2.0, 1.3, 0.5, 1.0, 0.9], dtype=torch.float64)
    top_k = torch.tensor([5, 40, 3, 0, 200, vocab - 1, 2, 1], dtype=torch.int64)
    return logits.to(device), temperature.to(device), top_k.to(device)


@pytest.mark.parametrize(("vocab", "chunk"), [(1000, 4096), (1000, 64), (5000, 512), (150, 64)])
def test_draw_equals_the_reference(device, vocab, chunk):
    """(150, 64): 3 chunks, 5 blocks with tokens and 8 slots of block maxima; top-k 7 > 5 blocks."""
    logits, temperature, top_k = _rows(device, vocab)
    if vocab == 150:
        top_k[0] = 7
    noise = _noise(8, vocab, device)
    for k in (top_k, None):
        got = cuda_sampling._select(logits, temperature, k, noise, chunk=chunk)
        want = ref_sampling.sample_tokens(logits, temperature, k, None, None, noise)
        assert got.dtype == torch.int64 and got.tolist() == want.tolist()


@pytest.mark.parametrize("vocab", [1000])
def test_filter_equals_the_reference(device, vocab):
    logits, temperature, top_k = _rows(device, vocab)
    temperature[2] = 1.5  # the filter's contract has no greedy rows
    got = cuda_sampling.filter_logits(logits, temperature, top_k, None, None)
    assert torch.equal(got, ref_sampling.filter_logits(logits, temperature, top_k, None, None))
    got = cuda_sampling.filter_logits(logits, temperature, None, None, None)
    assert torch.equal(got, ref_sampling.filter_logits(logits, temperature, None, None, None))


def _nucleus_rows(
    device: torch.device, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows for the top-p / min-p path, with the boundary inside ties (thresholds kept off rounding's reach)."""
    logits, temperature, top_k = _rows(device, vocab)
    top_k = torch.tensor([0, 0, 0, 7, 0, 200, 0, 40], dtype=torch.int64, device=device)
    # row 1: 60 tokens tie at the top (1/60 each): top-p 0.51 keeps the first 31 by id; row 6: every token ties,
    # and its boundary lies past the first program's chunk (the tied tokens of earlier chunks count)
    top_p = torch.tensor([0.9, 0.51, 0.8, 0.95, 1.0, 0.5, 0.9037, 0.7], dtype=torch.float64, device=device)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.05, 0.2, 0.0, 0.0, 0.01], dtype=torch.float64, device=device)
    return logits, temperature, top_k, top_p, min_p


@pytest.mark.parametrize(("vocab", "chunk"), [(1000, 4096), (300, 256)])
def test_nucleus_filter_equals_the_reference(device, vocab, chunk):
    """top-p alone, min-p alone, all three filters: the same kept tokens, the same fp64 values. (1000, 4096): one
    program a row, 4 histogram tiles each; (300, 256): 2 programs a row, the second part-filled. (The interpreter
    takes ~30 ms a program: the sizes are small on purpose.)"""
    logits, temperature, top_k, top_p, min_p = _nucleus_rows(device, vocab)
    temperature[2] = 1.5  # the filter's contract has no greedy rows
    for k, p, m in ((None, top_p, None), (None, None, min_p), (top_k, top_p, min_p)):
        got = cuda_sampling._nucleus(logits, temperature, k, p, m, None, chunk=chunk)
        want = ref_sampling.filter_logits(logits, temperature, k, p, m)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (k is None, p is None, m is None)
        assert torch.equal(got, want)
    kept = torch.isfinite(cuda_sampling._nucleus(logits, temperature, None, top_p, None, None, chunk=chunk))
    assert kept[1, 100:131].all() and not kept[1, 131:160].any()  # the tie broken by id, as the stable sort does
    assert kept[4].all()  # top-p 1 keeps everything


def test_nucleus_draws_equal_the_reference(device):
    """Greedy row 2 takes the plain argmax; the others draw among the kept tokens (the caller's noise, then the
    seeded noise hashed in the kernel)."""
    vocab, chunk = 500, 256
    logits, temperature, top_k, top_p, min_p = _nucleus_rows(device, vocab)
    noise = _noise(8, vocab, device)
    got = cuda_sampling._nucleus(logits, temperature, top_k, top_p, min_p, noise, chunk=chunk)
    assert got.tolist() == ref_sampling.sample_tokens(logits, temperature, top_k, top_p, min_p, noise).tolist()
    seeds, index = _SEEDS.to(device), _INDEX.to(device)
    for k, p, m in ((None, top_p, None), (None, None, min_p)):
        got = cuda_sampling._nucleus(logits, temperature, k, p, m, None, (seeds, index), chunk=chunk)
        want = ref_sampling.sample_tokens_seeded(logits, temperature, k, p, m, seeds, index)
        assert got.tolist() == want.tolist()
    assert cuda_sampling.sample_tokens(logits, temperature, None, None, None, None).tolist() == (
        logits.argmax(-1).tolist()
    )


def test_nucleus_row_does_not_depend_on_the_batch(device):
    logits, temperature, top_k, top_p, min_p = _nucleus_rows(device, 1000)
    seeds, index = _SEEDS.to(device), _INDEX.to(device)
    batch = cuda_sampling._nucleus(logits, temperature, top_k, top_p, min_p, None, (seeds, index), chunk=256)
    for r in (1, 3):
        one = cuda_sampling._nucleus(
            *(a[r : r + 1] for a in (logits, temperature, top_k, top_p, min_p)), None,
            (seeds[r : r + 1], index[r : r + 1]), chunk=512,
        )  # fmt: skip
        assert one.item() == batch[r].item()


def test_a_rows_token_does_not_depend_on_the_batch(device):
    logits, temperature, top_k = _rows(device, 1000)
    noise = _noise(8, 1000, device)
    batch = cuda_sampling._select(logits, temperature, top_k, noise, chunk=64)
    for r in (0, 3, 4):
        one = cuda_sampling._select(
            logits[r : r + 1], temperature[r : r + 1], top_k[r : r + 1], noise[r : r + 1], chunk=256
        )
        assert one.item() == batch[r].item()


def test_flash_vocabulary(device):
    """Flash's 129,280-token vocabulary at the default chunk: 64 scan programs a row, top-k 50 and no top-k."""
    torch.manual_seed(1)
    vocab = 129280
    logits = (torch.randn(2, vocab) * 4).to(device)
    temperature = torch.tensor([0.8, 1.0], dtype=torch.float64, device=device)
    top_k = torch.tensor([50, 0], dtype=torch.int64, device=device)
    noise = _noise(2, vocab, device, seed=7)
    got = cuda_sampling.sample_tokens(logits, temperature, top_k, None, None, noise)
    assert got.tolist() == ref_sampling.sample_tokens(logits, temperature, top_k, None, None, noise).tolist()


_SEEDS = torch.tensor([1, 2**40 + 5, -7, 123456789012, 0, 2**63 - 1, 99, 3], dtype=torch.int64)
_INDEX = torch.tensor([0, 1, 2, 3, 2**33 + 4, 17, 5, 6], dtype=torch.int64)


def test_seeded_noise_is_the_reference_hash(device):
    """The kernels' in-register noise = gumbel_noise (same integer hash; the fp64 logs may differ in the last
    place between libraries)."""

    @triton.jit
    def noise_rows(seeds_ptr, index_ptr, out_ptr, V: tl.constexpr):
        b = tl.program_id(0)
        ids = tl.arange(0, V)
        tl.store(out_ptr + b * V + ids, cuda_sampling._noise(out_ptr, seeds_ptr, index_ptr, b, V, ids, ids < V, True))

    vocab = 1024
    got = torch.empty(8, vocab, dtype=torch.float64, device=device)
    noise_rows[(8,)](_SEEDS.to(device), _INDEX.to(device), got, V=vocab)
    torch.testing.assert_close(got.cpu(), gumbel_noise(_SEEDS, _INDEX, vocab), rtol=1e-14, atol=0)


@pytest.mark.parametrize(("vocab", "chunk"), [(1000, 4096), (5000, 512)])
def test_seeded_draw_equals_the_reference(device, vocab, chunk):
    logits, temperature, top_k = _rows(device, vocab)
    seeds, index = _SEEDS.to(device), _INDEX.to(device)
    for k in (top_k, None):
        got = cuda_sampling._select(logits, temperature, k, None, (seeds, index), chunk=chunk)
        want = ref_sampling.sample_tokens_seeded(logits, temperature, k, None, None, seeds, index)
        assert got.tolist() == want.tolist()


def test_engine_sample_batch_on_the_cuda_backend(device):
    """The engine's batched draw through the cuda ops (the seeded op, in-kernel noise) = through the reference."""
    from dsv4.model_runtime.engine.sampler import SampleRequest, SamplingInputs, sample_batch
    from dsv4.model_runtime.engine.sampling_params import SamplingParams

    torch.manual_seed(3)
    logits = (torch.randn(5, 700) * 3).to(device)
    params = [
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=300),
        SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05),
    ]
    requests = [
        SampleRequest(p, seed=11 + i, index=i, prompt_token_ids=[1], output_token_ids=[]) for i, p in enumerate(params)
    ]
    inputs = SamplingInputs.build(requests, 700, device)
    got = sample_batch(ops.bind(device, "cuda"), logits, inputs)
    assert got.tolist() == sample_batch(ops.bind(device, "reference"), logits, inputs).tolist()
