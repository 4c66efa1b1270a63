"""The batched MTP verification step: two tokens per row over the paged pool, the same ops whatever the batch and
the context, no host sync but the one copy, a rejected draft's writes taken back on the device, and the tokens
(and logprobs, under every sampling stage) of plain decoding."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv4.model_runtime.engine.kv_state import KVCacheManager, PagedSequenceState
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.model_runner import ModelRunner
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.weights import load_model

from .op_trace import HostReads, OpTrace, op_differences
from .test_decode_step import EVERYTHING, GREEDY, _decoding, _prompts, _staggered
from .test_decode_step import _traced_step as _traced_decode_step
from .test_mtp import OracleRunner

pytestmark = pytest.mark.unit


def _verifying(engine: LLMEngine, lengths: list[int], params: SamplingParams) -> list[Request]:
    """Requests with prompts of `lengths`, stepped until every one of them verifies a draft each step."""
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(_prompts(lengths))]
    while any(s.num_generated < 2 or s.draft is None for s in seqs):
        engine.step()
    assert all(s.num_uncomputed == 1 for s in seqs)
    return seqs


def _traced_step(engine: LLMEngine) -> tuple[OpTrace, HostReads, list]:
    proposed = engine.runner.drafts.proposed
    ops, reads, outputs = _traced_decode_step(engine)
    assert engine.runner.drafts.proposed - proposed == len(outputs), "every row verified a draft"
    return ops, reads, outputs


@pytest.mark.parametrize("params", [GREEDY, EVERYTHING], ids=["greedy", "filters-penalties-logprobs"])
def test_verify_step_dispatches_the_same_ops_at_batch_1_and_32(
    make_engine: Callable[..., LLMEngine], params: SamplingParams
) -> None:
    traced = {}
    for batch in (1, 32):
        engine = make_engine(max_num_seqs=32, max_num_batched_tokens=2048, block_size=16, speculative_mtp=True)
        _verifying(engine, [5 + 3 * i for i in range(batch)], params)
        traced[batch], _, outputs = _traced_step(engine)
        assert len(outputs) == batch
    one, many = traced[1].ops, traced[32].ops
    assert one == many, op_differences(one, many)
    assert sum(one.values()) > 100


def test_verify_step_dispatches_the_same_ops_at_64_and_4096_tokens_of_context(
    make_engine: Callable[..., LLMEngine],
) -> None:
    traced = {}
    for context in (64, 4096):
        engine = make_engine(max_num_batched_tokens=4096, speculative_mtp=True)
        seqs = _verifying(engine, [context - 2, context - 2], EVERYTHING)
        assert all(context - 1 <= s.num_computed <= context + 8 for s in seqs)
        traced[context], _, _ = _traced_step(engine)
    short, long = traced[64].ops, traced[4096].ops
    assert short == long, op_differences(short, long)


@pytest.mark.parametrize("params", [GREEDY, EVERYTHING], ids=["greedy", "filters-penalties-logprobs"])
def test_verify_step_reads_only_its_one_copy_on_the_host(
    make_engine: Callable[..., LLMEngine], params: SamplingParams
) -> None:
    """No op that waits for the device, and one read of values: both draws of every row, the acceptances and the
    next drafts."""
    engine = make_engine(max_num_batched_tokens=256, block_size=16, speculative_mtp=True)
    seqs = _verifying(engine, [3, 17, 40], params)
    for _ in range(3):
        ops, reads, outputs = _traced_step(engine)
        assert ops.syncs == []
        assert len(reads.reads) == 1, [name for name, _ in reads.reads]
        name, values = reads.reads[0]
        assert name == "tolist"
        assert len(values) == 4 * len(seqs)  # two draws, the acceptance and the next draft per row
        ids = [int(row[0] if isinstance(row, list) else row) for row in values]
        n = len(seqs)
        assert ids[0 : 2 * n : 2] == [o.token_ids[0] for o in outputs]
        assert [len(o.token_ids) for o in outputs] == [1 + a for a in ids[2 * n : 3 * n]]
        assert [s.draft for s in seqs] == ids[3 * n :]


def _run(engine: LLMEngine, params: SamplingParams) -> dict[str, tuple[list[int], list]]:
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(_prompts([1, 9, 16, 33], seed=5))]
    while engine.has_unfinished():
        engine.step()
    return {s.request_id: (s.output_token_ids, s.logprobs) for s in seqs}


def test_verification_draws_what_plain_decoding_draws_under_every_sampling_stage(
    make_engine: Callable[..., LLMEngine],
) -> None:
    """Penalties (the second draw counts the draft, the table counts it only where it stands), filters, seeded
    draws and logprobs: right and wrong drafts give the plain tokens and logprobs."""
    params = dataclasses.replace(EVERYTHING, max_tokens=12)
    plain = _run(make_engine(max_num_batched_tokens=8), params)
    engine = make_engine(max_num_batched_tokens=8, speculative_mtp=True)
    oracle = OracleRunner(engine.model, {rid: tokens for rid, (tokens, _) in plain.items()})
    engine.runner = oracle
    got = _run(engine, params)
    assert 0 < oracle.drafts.accepted < oracle.drafts.proposed
    for rid, (tokens, logprobs) in plain.items():
        assert got[rid][0] == tokens, rid
        assert len(got[rid][1]) == len(logprobs)
        for a, b in zip(got[rid][1], logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_padded_verification_graphs_give_the_same_tokens(make_engine: Callable[..., LLMEngine]) -> None:
    """The graph path of verification steps (both parts run eagerly on CPU, through the graphs' static buffers):
    padding rows and the padded draws write only the sink slot and sink rows, so every request gets the plain
    tokens, with right and wrong drafts, greedy and seeded."""
    params = [
        SamplingParams(max_tokens=4 + i % 7, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)
        for i in range(12)
    ]
    plain = _staggered(make_engine(max_num_batched_tokens=64, block_size=8), params)
    engine = make_engine(max_num_batched_tokens=64, block_size=8, speculative_mtp=True)
    engine.runner = runner = OracleRunner(engine.model, plain, cuda_graphs=True)
    assert _staggered(engine, params) == plain
    graphs = runner.graphs
    assert graphs is not None and not graphs.capture
    assert {1, 2, 4, 8} <= {b for b, _ in graphs.verify_shapes}, graphs.verify_shapes
    assert 0 < runner.drafts.accepted < runner.drafts.proposed
    assert engine.kv.used_blocks == 0


def _pools(model: DeepseekV4, lengths: list[int], room: int) -> list[tuple[KVCacheManager, list[PagedSequenceState]]]:
    """Two pools with the same prompts prefilled, with room for `room` more tokens."""
    out = []
    for _ in range(2):
        kv = KVCacheManager(model, num_blocks=64, block_size=8, num_slots=len(lengths) + 1)
        states = []
        for i, prompt in enumerate(_prompts(lengths, seed=1)):
            seq = Request(f"s{i}", prompt, GREEDY, seed=0, eos_token_id=None)
            kv.grow(seq, len(prompt) + room)
            assert isinstance(seq.state, PagedSequenceState)
            model.prefill(torch.tensor([prompt]), [seq.state])
            states.append(seq.state)
        kv.pool.flush_block_tables()
        out.append((kv, states))
    return out


def _step(model: DeepseekV4, kv: KVCacheManager, states: list[PagedSequenceState], ids: torch.Tensor) -> tuple:
    """Feed ids [B, S] over the pool (S = 2: a verification step, its undo log kept); logits [B, S, vocab]."""
    pool = kv.pool
    columns = [[t, st.position, st.slot] for t, st in zip(ids[:, 0].tolist(), states, strict=True)]
    rows = torch.tensor([c + ids[b, 1:].tolist() for b, c in enumerate(columns)])
    width = max((st.position + ids.shape[1] - 1) // pool.block_size + 1 for st in states)
    inputs = DecodeInputs(rows, pool.block_tables[rows[:, 2], :width])
    step = inputs.step(pool)
    ids_in = inputs.verify_ids if inputs.verifies else inputs.token_ids.view(-1, 1)
    return model.logits(model.paged_streams(ids_in, step)), step


@pytest.fixture(scope="module")
def model64(flash_ckpt: Path) -> DeepseekV4:
    """float64: the two-token step computes in other batch shapes than one token at a time, and in fp32 the QAT's
    FP8 rounding of the window rows turns such differences into whole FP8 steps now and then."""
    return load_model(flash_ckpt, dtype=torch.float64)


@pytest.mark.parametrize("accepted", [False, True], ids=["rejected", "accepted"])
def test_a_verification_step_leaves_the_pool_as_plain_decoding_does(model64: DeepseekV4, accepted: bool) -> None:
    """[token, draft] per row, then the undo for rejected drafts: the same logits as feeding the tokens one by one,
    and the same pool (the whole window ring, the compressors' moved and live rows, the visible entries and
    indexer keys), across window, compressor-block and pool-block boundaries (a draft completes blocks too)."""
    model, cfg = model64, model64.cfg
    (plain_kv, plain), (verify_kv, verify) = _pools(model, [3, 4, 11, 24, 31], room=48)
    gen = torch.Generator().manual_seed(0)
    for n in range(20):
        tokens = torch.randint(3, 128000, (len(plain), 2), generator=gen)
        with torch.no_grad():
            expected = [_step(model, plain_kv, plain, tokens[:, :1])[0]]
            for st in plain:
                st.position += 1
            if accepted:
                expected.append(_step(model, plain_kv, plain, tokens[:, 1:])[0])
                for st in plain:
                    st.position += 1
            drafts = tokens if accepted else torch.stack([tokens[:, 0], (tokens[:, 1] + 1) % 128000], 1)
            logits, step = _step(model, verify_kv, verify, drafts)
            step.undo.restore(torch.full((len(verify),), not accepted))
        for st in verify:
            st.position += 2 if accepted else 1
        torch.testing.assert_close(logits[:, : len(expected)], torch.cat(expected, 1), atol=1e-9, rtol=0, msg=str(n))
    for a, b in zip(plain, verify, strict=True):
        assert a.position == b.position
        for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
            m = cfg.ratio(i)
            torch.testing.assert_close(lb.window, la.window, atol=1e-9, rtol=0)
            torch.testing.assert_close(lb.valid_entries(), la.valid_entries(), atol=1e-9, rtol=0)
            torch.testing.assert_close(lb.valid_index_keys(), la.valid_index_keys(), atol=1e-9, rtol=0)
            if m:
                live = (m if cfg.is_csa(i) else 0) + a.position % m
                for name in ("comp_kv", "comp_score", "icomp_kv", "icomp_score"):
                    torch.testing.assert_close(getattr(lb, name)[:live], getattr(la, name)[:live], atol=1e-9, rtol=0)


@pytest.mark.parametrize("verify", [False, True], ids=["decode", "verification"])
def test_graphs_end_at_the_head_input_and_the_head_runs_on_the_step_rows(
    make_engine: Callable[..., LLMEngine], verify: bool
) -> None:
    """A graph's static output stays allocated for the graph's life, one per (bucket, width), so it is the head's
    input [bucket, d], not fp32 logits (2 * vocab / d times larger); the head runs after the replay on the step's
    rows alone: 3 rows padded to a bucket of 4 reach the head as 3, and give the eager step's logits."""
    runs = {}
    for graphs in (False, True):
        engine = make_engine(block_size=16, speculative_mtp=verify)
        engine.runner = runner = ModelRunner(engine.model, use_mtp=verify, cuda_graphs=graphs)
        seqs = (_verifying if verify else _decoding)(engine, [5, 9, 17], GREEDY)
        heads: list[tuple[int, ...]] = []
        hook = engine.model.head.register_forward_hook(lambda m, args, out, seen=heads: seen.append(args[0].shape))
        try:
            logits = runner.verify_logits(seqs).logits if verify else runner.decode_logits(seqs)
        finally:
            hook.remove()
        d = engine.model.cfg.hidden_size
        assert [tuple(shape) for shape in heads] == [(3, 2, d) if verify else (3, d)]
        runs[graphs] = logits
        if graphs:
            assert runner.graphs is not None
            shapes = runner.graphs.verify_shapes if verify else runner.graphs.shapes
            assert 4 in {b for b, _ in shapes}, shapes  # the 3 rows replayed a graph of 4
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)
