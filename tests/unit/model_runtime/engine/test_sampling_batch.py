"""The batched sampler: the counter-based noise, batch independence of every stage, logprobs and penalties."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import ops
from dsv4.kernels.reference.sampling import gumbel_noise, mix32
from dsv4.model_runtime.engine.sampler import (
    SampleRequest,
    SamplingFlags,
    SamplingInputs,
    apply_penalties,
    penalize,
    sample,
    sample_batch,
    unpack,
)
from dsv4.model_runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit
REF = ops.bind("cpu", "reference")


def _lowbias32(x: int) -> int:
    """The hash in plain Python integers (no wrapping involved)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_is_lowbias32_on_uint32_bit_patterns() -> None:
    """The torch version relies on int32 multiplication wrapping: checked here against exact integers, over
    values that overflow every product (8,193 of them, so vectorized loops and their tails both run)."""
    gen = torch.Generator().manual_seed(0)
    values = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, *torch.randint(0, 2**32, (8188,), generator=gen).tolist()]
    as_int32 = torch.tensor([v - 2**32 if v >= 2**31 else v for v in values], dtype=torch.int32)
    got = [v & 0xFFFFFFFF for v in mix32(as_int32).tolist()]
    assert got == [_lowbias32(v) for v in values]


def test_gumbel_noise_depends_on_seed_and_index_only() -> None:
    seeds = torch.tensor([7, 7, 2**62 + 5, 7])
    index = torch.tensor([0, 1, 0, 0])
    noise = gumbel_noise(seeds, index, 5000)
    assert noise.dtype == torch.float64 and noise.shape == (4, 5000)
    assert torch.equal(noise[0], noise[3]), "the same (seed, index) gives the same noise in any row"
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(gumbel_noise(seeds[1:2], index[1:2], 5000)[0], noise[1]), "independent of the batch"
    # standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6
    flat = gumbel_noise(torch.arange(40), torch.zeros(40, dtype=torch.long), 5000).flatten()
    assert abs(float(flat.mean()) - 0.5772) < 0.01 and abs(float(flat.var()) - 1.6449) < 0.03


def _requests(params: list[SamplingParams]) -> list[SampleRequest]:
    return [SampleRequest(p, seed=31 * i, index=i, prompt_token_ids=[1, 2, 3], output_token_ids=[4, 4]) for i, p in
            enumerate(params)]  # fmt: skip


def test_each_row_samples_as_it_would_alone() -> None:
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=5, seed=1),
        SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.5, seed=2),
        SamplingParams(temperature=1.3, min_p=0.05, frequency_penalty=0.5, logprobs=2, seed=3),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=0),
    ]
    torch.manual_seed(0)
    logits = torch.randn(len(params), 300) * 2
    requests = _requests(params)
    together = sample(REF, logits, requests)
    for row, req in enumerate(requests):
        assert sample(REF, logits[row : row + 1], [req]) == [together[row]], f"row {row}"
    assert together[0] == (int(logits[0].argmax()), None)
    token, record = together[3]
    assert record is not None and len(record.top) == 2 and together[4][1] is not None and together[4][1].top == ()
    logp = torch.log_softmax(logits[3], -1)
    assert record.logprob == pytest.approx(float(logp[token]))
    assert [t for t, _ in record.top] == logp.topk(2).indices.tolist()


def test_flags_say_which_stages_run() -> None:
    greedy = SamplingFlags.of([SamplingParams(temperature=0.0, top_k=3)])
    assert greedy.greedy and not greedy.top_k and greedy.logprobs == -1
    mixed = SamplingFlags.of([SamplingParams(temperature=0.0), SamplingParams(top_p=0.5, logprobs=4)])
    assert not mixed.greedy and mixed.top_p and not mixed.top_k and not mixed.min_p and mixed.logprobs == 4


def test_penalties_batched_equal_penalties_alone() -> None:
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5), SamplingParams(), SamplingParams(
        frequency_penalty=-1.0)]  # fmt: skip
    torch.manual_seed(1)
    logits = torch.randn(3, 10)
    requests = _requests(params)
    inputs = SamplingInputs.build(requests, 10, logits.device)
    assert inputs.penalties is not None
    batched = penalize(logits, inputs.penalties)
    for row, req in enumerate(requests):
        assert torch.equal(batched[row], apply_penalties(logits[row], req))
    assert torch.equal(batched[1], logits[1])


def test_unpack_reads_the_packed_rows() -> None:
    params = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.0)]
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    inputs = SamplingInputs.build(_requests(params), 3, logits.device)
    packed = sample_batch(REF, logits, inputs)
    assert packed.shape == (2, 2 + 2 * 1)
    out = unpack(packed, params)
    assert out[0][0] == 1 and out[0][1] is not None and out[0][1].top[0][0] == 1
    assert out[1] == (0, None)


def test_logit_bias_moves_the_draw_before_penalties_and_keeps_the_model_logprobs() -> None:
    """+100 makes a token certain, -100 rules the best one out, a bias changes only its own row (each row draws what
    it draws alone), it is added before the penalties (a penalized biased token is still penalized), and the
    logprobs stay the model's."""
    torch.manual_seed(2)
    logits = torch.randn(4, 300) * 2
    best = int(logits[1].argmax())
    params = [
        SamplingParams(temperature=1.0, seed=5, logit_bias={7: 100.0}, logprobs=1),
        SamplingParams(temperature=0.0, logit_bias={best: -100.0}),
        SamplingParams(temperature=0.8, seed=6),
        SamplingParams(temperature=0.0, logit_bias={3: 100.0, 4: 100.0}, repetition_penalty=2.0),
    ]
    requests = _requests(params)  # context [1, 2, 3, 4, 4]: tokens 3 and 4 are seen
    together = sample(REF, logits, requests)
    for row, req in enumerate(requests):
        assert sample(REF, logits[row : row + 1], [req]) == [together[row]], f"row {row}"
    token, record = together[0]
    assert token == 7 and record is not None
    assert record.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[7]))
    assert together[1][0] != best and together[1][0] == int(logits[1].topk(2).indices[1])
    # both biased tokens are seen, so the repetition penalty divides their biased logits alike: the larger wins
    assert together[3][0] == (3 if logits[3, 3] > logits[3, 4] else 4)
    assert SamplingFlags.of(params).bias and not SamplingFlags.of(params[2:3]).bias


def test_sampling_params_check_their_logit_bias() -> None:
    assert SamplingParams(logit_bias={"9": 1, 2: -3.5}).logit_bias == ((2, -3.5), (9, 1.0))
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={5: 101.0})
    with pytest.raises(ValueError, match="logit_bias token ids must be >= 0"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match="names a token id twice"):
        SamplingParams(logit_bias=((5, 1.0), (5, 2.0)))
