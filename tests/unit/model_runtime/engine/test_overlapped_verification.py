"""Overlapped scheduling with MTP speculative decoding: a verification step is launched before the previous one's
draws reach the host, each row fed on the device with the token after its accepted prefix, the position that token
stands at and the MTP's next draft (`LaunchedVerify.fed`). The random model's MTP guesses wrong, so the drafts come
from a device lookup table of the true continuations (`LutRunner`), right after an even token and wrong after an
odd one: both outcomes of verification run in steps whose drafts never reach the host before the next launch."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.model_runner import LaunchedStep, LaunchedVerify, ModelRunner
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.speculative import VerifyStep
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

from .test_overlap_scheduling import (
    _assert_drained,
    _assert_same_outcome,
    _count_launches,
    _prompts,
    _step_reading_only_landed_tokens,
)
from .test_overlap_scheduling import _run as run_staggered

pytestmark = pytest.mark.unit


class LutRunner(ModelRunner):
    """Keeps the MTP module in step but takes each draft from `lut` [vocab] (device) at the row's last token, on
    the device as the MTP's own drafts are (`finish_verify`, and after a prompt: `_run_mtp`). Counts the positions
    launched verification steps found their rows moved on the device (accepted drafts the host had not counted
    yet)."""

    def __init__(self, model: DeepseekV4, sequences: list[list[int]], cuda_graphs: bool = False) -> None:
        super().__init__(model, use_mtp=True, cuda_graphs=cuda_graphs)
        vocab = model.cfg.vocab_size
        self.lut = torch.zeros(vocab, dtype=torch.int64, device=model.device)
        for seq in sequences:
            for a, b in itertools.pairwise(seq):
                self.lut[a] = b if a % 2 == 0 else (b + 1) % vocab
        self.moved_on_device = torch.zeros((), dtype=torch.int64, device=model.device)  # summed without a host read

    def finish_verify(self, verify: VerifyStep, tokens: torch.Tensor) -> torch.Tensor:
        super().finish_verify(verify, tokens)
        last = torch.where(tokens[:, 0] == verify.drafts, tokens[:, 1], tokens[:, 0])
        return self.lut[last]

    def _run_mtp(self, ready: list[Request], tokens: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        drafted, _ = super()._run_mtp(ready, tokens)
        rows = torch.tensor([ready.index(s) for s in drafted], dtype=torch.int64)
        return drafted, self.lut[tokens[rows]]

    def _launch_verify(self, seqs: list[Request], after: LaunchedStep | None) -> LaunchedVerify:
        fed = self._fed_verify(seqs, after)
        if fed is not None:
            self.moved_on_device += fed[:, 1].sum()
        return super()._launch_verify(seqs, after)


def _lut_engine(
    make_engine: Callable[..., LLMEngine],
    model: DeepseekV4,
    sequences: list[list[int]],
    graphs: bool = False,
    **config: int | bool,
) -> LLMEngine:
    engine = make_engine(speculative_mtp=True, overlap_scheduling=True, **config)
    engine.runner = LutRunner(model, sequences, cuda_graphs=graphs)
    return engine


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_launched_verification_steps_give_the_synchronous_outputs(
    make_engine: Callable[..., LLMEngine], model: DeepseekV4, graphs: bool
) -> None:
    """Staggered arrivals and finishes (max_tokens 1 included), greedy and seeded draws with logprobs: the tokens
    and logprobs of plain synchronous decoding, eagerly and through the graph path (fed rows copied into the
    graph's static inputs on the device; eager at "replay" on a CPU). Verification steps were launched fed from the
    one in flight, drafts accepted there moved rows on the device, rejected ones were taken back, a penalized row
    among them (its context the device table, which counts the accepted drafts' tokens on their way)."""
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, seed=1, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.7, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.7, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True),
    ]
    want = run_staggered(make_engine(max_num_batched_tokens=64, block_size=8), params)
    prompts = _prompts(len(params))
    engine = _lut_engine(
        make_engine,
        model,
        [p + want[f"r{i}"][0] for i, p in enumerate(prompts)],
        graphs,
        max_num_batched_tokens=64,
        block_size=8,
    )
    launches = _count_launches(engine)
    got = run_staggered(engine, params)
    for rid in want:
        _assert_same_outcome(got[rid], want[rid], rid)
    runner = engine.runner
    assert isinstance(runner, LutRunner)
    assert any(launch.fed for launch in launches)
    assert any(launch.penalized and launch.fed for launch in launches)
    assert 0 < runner.drafts.accepted < runner.drafts.proposed
    assert int(runner.moved_on_device) > 0
    _assert_drained(engine)


def test_a_launched_verification_step_reads_nothing_on_the_host(
    make_engine: Callable[..., LLMEngine], model: DeepseekV4
) -> None:
    """A steady overlapped step of verification rows dispatches no op that waits for the device and reads one thing
    on the host: the draws, acceptances and next drafts of the step it lands."""
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, logprobs=2, seed=3, ignore_eos=True)
    want = [o.token_ids for o in make_engine().generate_ids(prompts, params)]
    engine = _lut_engine(
        make_engine,
        model,
        [p + w for p, w in zip(prompts, want, strict=True)],
        max_num_batched_tokens=256,
        block_size=16,
    )
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    while engine._launched is None or engine._launched.verify is None:
        engine.step()
    for _ in range(3):
        in_flight = engine._launched
        outputs = _step_reading_only_landed_tokens(engine)
        assert engine._launched is not None and engine._launched is not in_flight
        assert engine._launched.verify is not None and set(engine._launched.verify.seqs) == set(seqs)
        assert {o.request_id for o in outputs} == {s.request_id for s in seqs}
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == want
    _assert_drained(engine)


def test_a_row_finishing_on_an_accepted_draft_drops_its_launched_step(
    make_engine: Callable[..., LLMEngine], model: DeepseekV4
) -> None:
    """max_tokens reached by the second token of an accepted draft, and a stop token drawn as a first token, while
    the next verification step is launched: that step's tokens for the row are dropped, the others go on."""
    prompts = _prompts(4)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in make_engine().generate_ids(prompts, greedy)]
    stop = want[2][5]
    params = [
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        greedy,
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
    ]
    engine = _lut_engine(make_engine, model, [p + w for p, w in zip(prompts, want, strict=True)])
    outs = engine.generate_ids(prompts, params)
    assert [o.token_ids for o in outs] == [want[0][:5], want[1], want[2][: want[2].index(stop) + 1], want[3][:7]]
    _assert_drained(engine)


def test_an_arrival_prefilled_with_the_mtp_beside_fed_verification_rows_reads_nothing_on_the_host(
    make_engine: Callable[..., LLMEngine], model: DeepseekV4
) -> None:
    """A request arriving while others verify drafts is prefilled in launched steps beside their fed rows (its 33
    tokens in two chunks, the first ending at the prefix cache's snapshot point): the MTP follows its chunks, its
    last position paired on the device with the first token on its way, and its first verification is fed that
    token and the MTP's draft from the device. No syncing op and one host read a step; the tokens are plain
    decoding's."""
    prompts = [*_prompts(3), _prompts(12)[-1]]
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, logprobs=2, seed=3, ignore_eos=True)
    want = [o.token_ids for o in make_engine().generate_ids(prompts, params)]
    sequences = [p + w for p, w in zip(prompts, want, strict=True)]
    engine = _lut_engine(make_engine, model, sequences, max_num_batched_tokens=256, block_size=16)
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts[:3])]
    while engine._launched is None or engine._launched.verify is None:
        engine.step()
    arrival = engine.add_request("arrival", prompts[3], params)
    for computed in (32, 33):
        _step_reading_only_landed_tokens(engine)
        assert arrival.num_computed == computed
    assert engine._launched is not None and arrival in engine._launched.drafted  # its draft stays on the device
    engine.step()
    assert engine._launched is not None and engine._launched.verify is not None
    assert arrival in engine._launched.verify.rows  # verifying the draft it was fed
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in [*seqs, arrival]] == want
    _assert_drained(engine)


def test_a_prefill_to_export_with_the_mtp_in_a_launched_step_gives_the_synchronous_blob(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """A prefill to export arriving beside fed verification rows runs in launched steps, the MTP following its chunks
    with its first token paired on the device: its blob (the MTP layer's state and the MTP's draft included) is the
    one a synchronous engine exports, byte for byte."""
    prompt = _prompts(12)[-1]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sync = make_engine(speculative_mtp=True)
    alone = sync.add_request("export", prompt, params, export_after_prefill=True)
    while sync.has_unfinished():
        sync.step()
    assert sync.exported.pop("export") is alone and alone.state is not None and alone.draft is not None
    want = sync.runner.export_chunks(alone.state, 1 << 20, alone.draft)
    sync.release(alone)

    engine = make_engine(speculative_mtp=True, overlap_scheduling=True)
    for i, p in enumerate(_prompts(3)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    while engine._launched is None or engine._launched.verify is None:
        engine.step()
    launches = _count_launches(engine)
    export = engine.add_request("export", prompt, params, export_after_prefill=True)
    steps = 0
    while not export.finished:
        engine.step()
        steps += 1
    assert len(launches) == steps  # every step was launched: none ran synchronously
    while engine.has_unfinished():
        engine.step()
    assert engine.exported.pop("export") is export and export.state is not None
    assert export.output_token_ids == alone.output_token_ids and export.draft == alone.draft
    assert engine.runner.export_chunks(export.state, 1 << 20, export.draft) == want
    engine.release(export)
    _assert_drained(engine)


def test_overlapped_verification_survives_preemption(make_engine: Callable[..., LLMEngine], model: DeepseekV4) -> None:
    """A pool of 12 blocks of 8 positions cannot hold the batch, whose rows reserve 3 positions a fed verification:
    sequences are preempted (the launched step lands first, then the step is scheduled again, preempting) and
    recomputed, their MTP state and drafts with them, and the tokens stay plain decoding's."""
    prompts = _prompts(12)
    params = [SamplingParams(max_tokens=6 + i % 7, temperature=0.0, ignore_eos=True) for i in range(12)]
    want = [o.token_ids for o in make_engine().generate_ids(prompts, params)]
    sequences = [p + w for p, w in zip(prompts, want, strict=True)]
    engine = _lut_engine(make_engine, model, sequences, num_blocks=12, block_size=8, max_num_batched_tokens=24)
    launches = _count_launches(engine)
    seqs = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    while engine.has_unfinished():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert any(launch.fed for launch in launches) and engine.runner.drafts.accepted > 0
    assert [s.output_token_ids for s in seqs] == want
    _assert_drained(engine)
