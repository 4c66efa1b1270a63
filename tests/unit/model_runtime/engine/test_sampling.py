"""Sampling: seeded draws reproducible and batch-independent, filters, penalties, logprobs, stops, streaming."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv4.kernels import ops
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.sampler import SampleRequest, apply_penalties, filtered_probs, sample_row
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.unit
REF = ops.bind("cpu", "reference")

PROMPT = [15, 2000, 31337, 42, 7, 99, 1234, 5678, 910, 11]


def _gen(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.token_ids for o in engine.generate_ids(prompts, params)]


def test_seeded_sampling_reproducible_and_batch_independent(make_engine: Callable[..., LLMEngine]) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = _gen(make_engine(), [PROMPT], params)[0]
    assert _gen(make_engine(), [PROMPT], params)[0] == alone
    others = [SamplingParams(max_tokens=5, temperature=0.8, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    batch = _gen(make_engine(), [[5, 6, 7], PROMPT, [8] * 20, PROMPT], [others[0], params, others[1], others[2]])
    assert batch[1] == alone
    assert batch[3] != alone, "another seed gives other tokens"
    greedy = _gen(make_engine(), [PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert alone != greedy, "temperature 1 over a near-flat distribution should not be greedy"


def test_resumed_decode_continues_the_seeded_stream(make_engine: Callable[..., LLMEngine]) -> None:
    """Replaying the first k tokens (recompute path) continues with the tokens the original run drew."""
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=77, ignore_eos=True)
    full = _gen(make_engine(), [PROMPT], params)[0]
    for k in (1, 4):
        engine = make_engine()
        seq = engine.add_request("resume", PROMPT, params, output_token_ids=full[:k])
        while not seq.finished:
            engine.step()
        assert seq.output_token_ids == full


def test_greedy_decode_recomputed_at_any_token_continues_the_same(make_engine: Callable[..., LLMEngine]) -> None:
    """A takeover recomputes prompt + streamed tokens in one prefill; the continuation must not change.

    This prompt (the SIGKILL e2e test's request 7) once diverged when resumed after 21 tokens: a bf16 tie in the
    indexer's top-k was broken one way in a decode row and the other way in the prefill's rows.
    """
    prompt = [(31 * k + 49) % 120000 + 100 for k in range(19)]
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    full = _gen(make_engine(), [prompt], params)[0]
    engine = make_engine(max_num_seqs=64, max_num_batched_tokens=4096)
    resumed = {k: engine.add_request(f"r{k}", prompt, params, output_token_ids=full[:k]) for k in range(1, 48)}
    while not all(seq.finished for seq in resumed.values()):
        engine.step()
    assert [k for k, seq in resumed.items() if seq.output_token_ids != full] == []


def test_filters_that_leave_one_token_are_greedy(make_engine: Callable[..., LLMEngine]) -> None:
    greedy = _gen(make_engine(), [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    for p in (
        SamplingParams(max_tokens=6, temperature=2.0, top_k=1, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=2.0, top_p=1e-9, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=2.0, min_p=1.0, seed=5, ignore_eos=True),
    ):
        assert _gen(make_engine(), [PROMPT], p)[0] == greedy, p


def test_filtered_probs_keep_exactly_the_allowed_tokens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits.double(), -1)
    top_k = filtered_probs(REF, logits, SamplingParams(top_k=3))
    assert (top_k > 0).tolist() == [True, True, True, False, False, False]
    # top-p keeps the smallest prefix (by probability) whose mass reaches p.
    p = float(probs[0] + probs[1]) - 1e-6
    assert (filtered_probs(REF, logits, SamplingParams(top_p=p)) > 0).tolist() == [True, True] + [False] * 4
    min_p = filtered_probs(REF, logits, SamplingParams(min_p=0.3))
    assert (min_p > 0).tolist() == (probs >= 0.3 * probs.max()).tolist()
    hot = filtered_probs(REF, logits, SamplingParams(temperature=2.0))
    assert torch.allclose(hot / hot.sum(), torch.softmax(logits.double() / 2.0, -1))


def test_seeded_draws_follow_the_distribution() -> None:
    """Over many indexes, the drawn tokens' frequencies match the probabilities (inverse-CDF draws)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -9.0])
    probs = torch.softmax(logits.double(), -1)
    params = SamplingParams(temperature=1.0, top_k=4)
    counts = torch.zeros(5)
    n = 4000
    for i in range(n):
        token, _ = sample_row(
            REF, logits, SampleRequest(params, seed=9, index=i, prompt_token_ids=[], output_token_ids=[])
        )
        counts[token] += 1
    kept = probs[:4] / probs[:4].sum()
    assert counts[4] == 0
    assert torch.allclose(counts[:4] / n, kept.float(), atol=0.03)


def test_penalties() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    req = SampleRequest(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        seed=0,
        index=0,
        prompt_token_ids=[0],
        output_token_ids=[1, 2, 2],
    )
    got = apply_penalties(logits, req)
    # token 0: prompt only -> 2/2; token 1: -2*2 - 0.5 - 0.25; token 2: 1/2 - 0.5 - 0.5; token 3 untouched.
    assert got.tolist() == [1.0, -4.75, -0.5, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5], "penalties must not modify the model's logits in place"


def test_penalties_see_the_prompt_and_the_outputs(make_engine: Callable[..., LLMEngine]) -> None:
    """Penalties below 1 / below 0 reward repeats: they must act on the prompt's and the generated tokens."""
    plain = _gen(make_engine(), [PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert not set(plain) & set(PROMPT) and len(set(plain)) == len(plain)
    echo = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=0.01)
    assert _gen(make_engine(), [PROMPT], echo)[0][0] in PROMPT
    loop = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, presence_penalty=-2.0, frequency_penalty=-2.0)
    looped = _gen(make_engine(), [PROMPT], loop)[0]
    assert looped[0] == plain[0] and len(set(looped)) < len(looped)


def test_logprobs(make_engine: Callable[..., LLMEngine]) -> None:
    out = make_engine().generate_ids(
        [PROMPT], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert len(lp.top) == 3
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob < 0


def test_stop_token_ids_and_max_tokens(make_engine: Callable[..., LLMEngine]) -> None:
    free = _gen(make_engine(), [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    stop_at = free[3]
    first = free.index(stop_at)
    out = make_engine().generate_ids(
        [PROMPT], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,))
    )[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"
    out = make_engine().generate_ids([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == free[:5] and out.finish_reason == "length"


def test_stop_strings_cut_exactly_and_stream_concatenates(
    make_engine: Callable[..., LLMEngine], tokenizer: Tokenizer
) -> None:
    base = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    full = make_engine().generate_ids([PROMPT], base)[0]
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    # A stop string straddling a token boundary, and one that never occurs next to it.
    ends = [len(tokenizer.decode(full.token_ids[:k])) for k in range(1, 17)]
    cut = next(e for e in ends if 3 <= e < len(full.text) - 4)
    stop = full.text[cut - 2 : cut + 2]
    expected = full.text[: full.text.find(stop)]
    for stops in ((stop,), ("\x00never\x00", stop)):
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=stops)
        engine = make_engine()
        out = engine.generate_ids([PROMPT], params)[0]
        assert out.text == expected and out.finish_reason == "stop"
        assert len(out.token_ids) < 16
        engine.add_request("s", PROMPT, params)
        deltas = []
        while engine.has_unfinished():
            deltas.extend(o.text for o in engine.step())
        assert "".join(deltas) == expected
    # Without stop strings the deltas are the whole text.
    engine = make_engine()
    engine.add_request("plain", PROMPT, base)
    deltas = []
    while engine.has_unfinished():
        deltas.extend(o.text for o in engine.step())
    assert "".join(deltas) == full.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config",
    [{}, {"overlap_scheduling": True, "speculative_mtp": True}],
    ids=["synchronous", "overlapped-mtp"],
)
def test_logit_bias_reaches_every_draw(make_engine: Callable[..., LLMEngine], config: dict[str, bool]) -> None:
    """A +100 bias makes its token every draw, the prefill's, the decode steps' and (with MTP) both rows of a
    verification step, while the unbiased request beside it draws its own greedy tokens; a biased id outside the
    vocabulary is refused when the request is added."""
    engine = make_engine(**config)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    biased = SamplingParams(max_tokens=6, temperature=0.7, seed=3, logit_bias={4242: 100.0}, ignore_eos=True)
    want = _gen(make_engine(), [PROMPT[:5]], plain)[0]
    assert _gen(engine, [PROMPT, PROMPT[:5]], [biased, plain]) == [[4242] * 6, want]
    assert engine.runner.drafts.proposed > 0 if config else engine.runner.drafts.proposed == 0
    with pytest.raises(ValueError, match=r"logit_bias ids \[999999\] outside the vocabulary"):
        engine.add_request("r", PROMPT, SamplingParams(logit_bias={999999: 1.0}))
