"""Overlapped scheduling (`EngineConfig.overlap_scheduling`): a step is launched before the previous step's tokens
reach the host, its rows waiting for them fed on the device. The CPU runs each op as it is dispatched, so
these tests check what the GPU path rests on: the synchronous engine's outputs, launches ahead of landings, a
launch that reads nothing on the host, and nothing left in flight or held once requests finish."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import LLMEngine, RequestOutput
from dsv4.model_runtime.engine.model_runner import LaunchedStep
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.scheduler import ScheduledChunk

from .test_decode_step import _traced_step

pytestmark = pytest.mark.unit

Outcome = tuple[list[int], str, str | None, list[Any]]  # tokens, text, finish reason, logprobs


def _prompts(n: int, seed: int = 11) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 33][:n]
    return [torch.randint(3, 128000, (k,), generator=gen).tolist() for k in lengths]


def _mixed_params() -> list[SamplingParams]:
    """Greedy, seeded nucleus sampling with logprobs, penalized rows (counted in the device table), one token."""
    out = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            out.append(SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True))
        elif kind == 1:
            out.append(SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=i, logprobs=2, ignore_eos=True))
        elif kind == 2:
            out.append(SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3, ignore_eos=True))
        else:
            out.append(SamplingParams(max_tokens=1 if i == 3 else 7, temperature=0.7, seed=i, ignore_eos=True))
    return out


def _run(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, Outcome]:
    """Requests join two a step while others decode and finish; each request's whole output."""
    pending = list(enumerate(zip(_prompts(len(params)), params, strict=True)))
    got: dict[str, Outcome] = {}
    while pending or engine.has_unfinished():
        for i, (p, sp) in pending[:2]:
            engine.add_request(f"r{i}", p, sp)
        pending = pending[2:]
        for o in engine.step():
            tokens, text, _, logprobs = got.get(o.request_id, ([], "", None, []))
            got[o.request_id] = (tokens + o.token_ids, text + o.text, o.finish_reason, logprobs + o.logprobs)
    return got


@dataclass(frozen=True)
class Launch:
    """What one `ModelRunner.launch` call held."""

    fed: bool  # a row fed a token of the step still in flight
    penalized: bool  # a penalized row
    prefill: bool  # a chunk of several prompt tokens


def _count_launches(engine: LLMEngine) -> list[Launch]:
    """Record each `launch` call of the engine."""
    launches: list[Launch] = []
    launch = engine.runner.launch

    def counted(chunks: list[ScheduledChunk], after: LaunchedStep | None = None) -> LaunchedStep | None:
        fed = after is not None and any(after.holds(c.seq) for c in chunks)
        penalized = any(c.seq.params.penalized for c in chunks)
        launches.append(Launch(fed, penalized, any(c.num_tokens > 1 for c in chunks)))
        return launch(chunks, after)

    engine.runner.launch = counted  # type: ignore[method-assign]
    return launches


def _assert_same_outcome(got: Outcome, want: Outcome, rid: str) -> None:
    """The same tokens, text and finish reason; the same logprob records up to the last bits of their floats: the
    overlapped engine's steps hold other rows than the synchronous engine's (a row finishing on a landed token
    still runs in the launched step), and batched float results differ in the last bits with the batch
    (docs/engine.md, "Sampling and determinism")."""
    assert got[:3] == want[:3], rid
    assert len(got[3]) == len(want[3]), rid
    for g, w in zip(got[3], want[3], strict=True):
        assert g.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-5), rid
        assert [t for t, _ in g.top] == [t for t, _ in w.top], rid
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], rel=1e-5, abs=1e-5), rid


def _step_reading_only_landed_tokens(engine: LLMEngine) -> list[RequestOutput]:
    """One traced engine step of an overlapped engine: it dispatches no op that waits for the device and reads one
    thing on the host, the tokens it lands. Its outputs."""
    ops, reads, outputs = _traced_step(engine)
    assert ops.syncs == []
    assert [name for name, _ in reads.reads] == ["tolist"]
    return outputs


def _assert_drained(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    assert engine._launched is None, "a launched step outlived its requests"
    assert engine.kv.used_blocks == 0


def test_overlap_is_off_on_the_cpu_by_default(make_engine: Callable[..., LLMEngine]) -> None:
    assert make_engine().overlap is False
    assert make_engine(overlap_scheduling=True).overlap is True


def test_overlapped_steps_give_the_synchronous_outputs(make_engine: Callable[..., LLMEngine]) -> None:
    """Staggered arrivals and finishes, greedy and seeded draws, logprobs, penalized rows beside plain ones, a stop
    token and a stop string that end a request while its next step is already launched, max_tokens 1."""
    base = _mixed_params()
    first = _run(make_engine(max_num_batched_tokens=64, block_size=8), base)
    stop_token = first["r0"][0][2]
    text = first["r5"][1]
    assert len(text) >= 6, text
    params = list(base)
    params[0] = replace(base[0], stop_token_ids=(stop_token,))
    params[5] = replace(base[5], stop=(text[3:5],))

    sync = _run(make_engine(max_num_batched_tokens=64, block_size=8, overlap_scheduling=False), params)
    engine = make_engine(max_num_batched_tokens=64, block_size=8, overlap_scheduling=True)
    launches = _count_launches(engine)
    overlapped = _run(engine, params)

    assert sync["r0"][2] == "stop" and len(sync["r0"][0]) == first["r0"][0].index(stop_token) + 1
    assert sync["r5"][2] == "stop" and len(sync["r5"][0]) < params[5].max_tokens
    assert len(sync["r3"][0]) == 1
    assert overlapped.keys() == sync.keys()
    for rid, want in sync.items():
        _assert_same_outcome(overlapped[rid], want, rid)
    # steps launched while the previous one's tokens were in flight, penalized rows among them, and arrivals'
    # prefills beside fed rows
    assert sum(x.fed and x.penalized for x in launches) >= 3, launches
    assert sum(x.fed and x.prefill for x in launches) >= 3, launches
    _assert_drained(engine)


def test_overlapped_steps_survive_preemption(make_engine: Callable[..., LLMEngine]) -> None:
    """A pool of 12 blocks of 8 positions cannot hold the batch: sequences are preempted (only by a schedule
    without tokens in flight: the launched step's land first, then the step is scheduled again, preempting, and
    launched in the same call) and recomputed, with the synchronous tokens."""
    prompts = _prompts(12)
    params = [SamplingParams(max_tokens=3 + i % 6, temperature=0.0, ignore_eos=True) for i in range(12)]
    want = make_engine().generate_ids(prompts, params)
    engine = make_engine(num_blocks=12, block_size=8, max_num_batched_tokens=24, overlap_scheduling=True)
    launches = _count_launches(engine)
    seqs = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    idle = 0  # calls that ran no step although requests were left before and after them
    while engine.has_unfinished():
        before = len(launches)
        engine.step()
        idle += engine.has_unfinished() and len(launches) == before
        assert engine.kv.used_blocks <= engine.kv.total_blocks
    assert sum(s.num_preemptions for s in seqs) > 0
    assert any(x.fed for x in launches) and idle == 0
    assert [s.output_token_ids for s in seqs] == [w.token_ids for w in want]
    _assert_drained(engine)


def test_each_step_is_launched_before_the_previous_one_lands(make_engine: Callable[..., LLMEngine]) -> None:
    """Four requests of 6 tokens: the prefill step and decode steps 2..6 are each launched before the tokens of
    the step before land; the last step has no successor. Without overlapped scheduling each step lands at once."""
    events: list[str] = []

    def traced(engine: LLMEngine) -> LLMEngine:
        runner = engine.runner
        launch, land = runner.launch, runner.land

        def traced_launch(chunks: list[ScheduledChunk], after: LaunchedStep | None = None) -> LaunchedStep | None:
            events.append("launch")
            return launch(chunks, after)

        def traced_land(launched: LaunchedStep, after: LaunchedStep | None = None) -> list[Request]:
            events.append("land")
            return land(launched, after)

        runner.launch, runner.land = traced_launch, traced_land  # type: ignore[method-assign]
        return engine

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = traced(make_engine(max_num_batched_tokens=128, overlap_scheduling=True))
    outs = engine.generate_ids(_prompts(4), params)
    assert events == ["launch"] + ["launch", "land"] * 5 + ["land"]
    events.clear()
    want = traced(make_engine(max_num_batched_tokens=128, overlap_scheduling=False)).generate_ids(_prompts(4), params)
    assert events == ["launch", "land"] * 6
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    _assert_drained(engine)


def test_a_launch_reads_nothing_on_the_host(make_engine: Callable[..., LLMEngine]) -> None:
    """A steady overlapped step dispatches no op that waits for the device and reads one thing on the host: the
    tokens of the step it lands, which the device computed while the host launched the next one."""
    engine = make_engine(max_num_batched_tokens=256, block_size=16, overlap_scheduling=True)
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, logprobs=2, seed=3, ignore_eos=True)
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(_prompts(3))]
    while engine._launched is None:
        engine.step()
    for _ in range(3):  # steps that cross pool blocks, compressor blocks and the window
        in_flight = engine._launched
        outputs = _step_reading_only_landed_tokens(engine)
        assert engine._launched is not None and engine._launched is not in_flight
        assert [o.token_ids[0] for o in outputs] == [s.output_token_ids[-1] for s in seqs]


def test_an_arrival_prefilled_beside_fed_rows_reads_nothing_on_the_host(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """A request that arrives while others decode is prefilled in launched steps beside their fed rows (its 33
    tokens in two chunks: the first ends at the prefix cache's snapshot point, 32, whose copies queue behind the
    step): those steps, too, dispatch no op that waits for the device and read only the landed tokens."""
    engine = make_engine(max_num_batched_tokens=256, block_size=16, overlap_scheduling=True)
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, logprobs=2, seed=3, ignore_eos=True)
    for i, p in enumerate(_prompts(3)):
        engine.add_request(f"r{i}", p, params)
    while engine._launched is None:
        engine.step()
    launches = _count_launches(engine)
    arrival = engine.add_request("arrival", _prompts(12)[-1], params)
    entries = engine.stats_extra()["prefix_cache_entries"]
    for computed in (32, 33):
        _step_reading_only_landed_tokens(engine)
        assert arrival.num_computed == computed
    assert launches == [
        Launch(fed=True, penalized=False, prefill=True),
        Launch(fed=True, penalized=False, prefill=False),
    ]
    assert engine._launched is not None and engine._launched.holds(arrival)
    assert engine.stats_extra()["prefix_cache_entries"] > entries


def test_cancelling_a_request_in_flight(make_engine: Callable[..., LLMEngine]) -> None:
    """A request aborted while a step that holds it is launched: its launched token is dropped, its state is
    freed, and the others get the synchronous tokens."""
    prompts = _prompts(3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in make_engine().generate_ids(prompts, params)]
    engine = make_engine(overlap_scheduling=True)
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    tokens: dict[str, list[int]] = {}
    while engine._launched is None or seqs[1].num_generated < 3:
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    assert engine._launched is not None and seqs[1] in engine._launched.seqs
    cancelled = engine.abort("r1")
    assert cancelled is not None and cancelled.finish_reason == "cancelled"
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    assert tokens["r0"] == want[0] and tokens["r2"] == want[2]
    assert tokens["r1"] == want[1][: len(tokens["r1"])] and len(tokens["r1"]) < len(want[1])
    _assert_drained(engine)


def test_cancelling_every_request_in_flight_drops_the_step(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(overlap_scheduling=True)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(2)):
        engine.add_request(f"r{i}", p, params)
    while engine._launched is None:
        engine.step()
    engine.abort("r0")
    assert engine._launched is not None
    engine.abort("r1")
    _assert_drained(engine)
    assert engine.step() == []


def test_a_prefill_to_export_runs_in_a_launched_step_and_keeps_its_state(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """A prefill to export (a PD prefill worker's request) arriving while others decode in launched steps runs in
    a launched step beside them; its first token finishes it when it lands, so no step feeds it another, and the
    state it keeps stands at its prompt's end: the same KV blob a synchronous engine exports. The others keep
    the synchronous tokens. MTP steps never launch."""
    prompts, prompt = _prompts(3), _prompts(12)[-1]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in make_engine().generate_ids(prompts, params)]
    sync = make_engine()
    alone = sync.add_request("export", prompt, params, export_after_prefill=True)
    while sync.has_unfinished():
        sync.step()
    assert sync.exported.pop("export") is alone and alone.state is not None
    want_blob = sync.runner.export_chunks(alone.state, 1 << 20)
    sync.release(alone)

    engine = make_engine(overlap_scheduling=True)
    launches = _count_launches(engine)
    launched_with: list[set[str]] = []
    launch = engine.runner.launch

    def recorded(chunks: list[ScheduledChunk], after: LaunchedStep | None = None) -> LaunchedStep | None:
        launched_with.append({c.seq.request_id for c in chunks})
        return launch(chunks, after)

    engine.runner.launch = recorded  # type: ignore[method-assign]
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    while not launches or not launches[-1].fed:
        engine.step()
    export = engine.add_request("export", prompt, params, export_after_prefill=True)
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == want
    assert any({"export", "r0"} <= ids for ids in launched_with)  # beside the decoding rows
    kept = engine.exported.pop("export")
    assert kept is export and export.output_token_ids == alone.output_token_ids
    assert export.state is not None and export.state.position == len(prompt)
    assert engine.runner.export_chunks(export.state, 1 << 20) == want_blob
    engine.release(export)
    _assert_drained(engine)

    mtp = make_engine(speculative_mtp=True, overlap_scheduling=True)
    mtp_launches = _count_launches(mtp)
    got = [o.token_ids for o in mtp.generate_ids(prompts, params)]
    assert got == [o.token_ids for o in make_engine(speculative_mtp=True).generate_ids(prompts, params)]
    assert any(launch.fed for launch in mtp_launches)  # verification steps fed from the one in flight
    _assert_drained(mtp)
