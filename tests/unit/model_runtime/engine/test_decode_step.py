"""The batched decode step: the same ops whatever the batch and the context, no host sync but the one copy of the
sampled tokens, the same tokens as the per-sequence path, and the CUDA-graph padding (run eagerly on CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine.cuda_graphs import DecodeGraphs, batch_bucket, width_bucket
from dsv4.model_runtime.engine.kv_state import KVCacheManager
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.model_runner import ModelRunner
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

from .op_trace import HostReads, OpTrace, op_differences

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
# every sampling stage at once: filters, penalties, logprobs (the sampler's ops depend on which stages run)
EVERYTHING = SamplingParams(
    max_tokens=64,
    temperature=0.8,
    top_k=20,
    top_p=0.9,
    min_p=0.01,
    repetition_penalty=1.2,
    presence_penalty=0.3,
    frequency_penalty=0.2,
    logprobs=3,
    seed=5,
    ignore_eos=True,
    logit_bias=((7, 2.0), (300, -1.5)),
)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128000, (n,), generator=gen).tolist() for n in lengths]


def _decoding(engine: LLMEngine, lengths: list[int], params: SamplingParams) -> list[Request]:
    """Requests with prompts of `lengths`, stepped until every one of them decodes (one token a step)."""
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(_prompts(lengths))]
    while any(s.num_generated < 2 for s in seqs):
        engine.step()
    assert all(s.num_uncomputed == 1 for s in seqs)
    return seqs


def _traced_step(engine: LLMEngine) -> tuple[OpTrace, HostReads, list]:
    ops, reads = OpTrace(), HostReads()
    with reads, ops:
        outputs = engine.step()
    return ops, reads, outputs


@pytest.mark.parametrize("params", [GREEDY, EVERYTHING], ids=["greedy", "filters-penalties-logprobs"])
def test_decode_step_dispatches_the_same_ops_at_batch_1_and_32(
    make_engine: Callable[..., LLMEngine], params: SamplingParams
) -> None:
    traced = {}
    for batch in (1, 32):
        engine = make_engine(max_num_seqs=32, max_num_batched_tokens=2048, block_size=16)
        _decoding(engine, [5 + 3 * i for i in range(batch)], params)
        traced[batch], _, outputs = _traced_step(engine)
        assert len(outputs) == batch
    one, many = traced[1].ops, traced[32].ops
    assert one == many, op_differences(one, many)
    assert sum(one.values()) > 100


@pytest.mark.parametrize("params", [GREEDY, EVERYTHING], ids=["greedy", "filters-penalties-logprobs"])
def test_decode_step_dispatches_the_same_ops_at_64_and_4096_tokens_of_context(
    make_engine: Callable[..., LLMEngine], params: SamplingParams
) -> None:
    traced = {}
    for context in (64, 4096):
        engine = make_engine(max_num_batched_tokens=4096)
        seqs = _decoding(engine, [context - 2, context - 2], params)
        assert all(context - 1 <= s.num_computed <= context + 8 for s in seqs)
        traced[context], _, _ = _traced_step(engine)
    short, long = traced[64].ops, traced[4096].ops
    assert short == long, op_differences(short, long)


@pytest.mark.parametrize("params", [GREEDY, EVERYTHING], ids=["greedy", "filters-penalties-logprobs"])
def test_decode_step_reads_only_the_sampled_tokens_on_the_host(
    make_engine: Callable[..., LLMEngine], params: SamplingParams
) -> None:
    """No op that waits for the device, and one read of values: the sampled tokens, in one copy."""
    engine = make_engine(max_num_batched_tokens=256, block_size=16)
    _decoding(engine, [3, 17, 40], params)
    for _ in range(3):  # steps that cross blocks, compressor blocks and the window
        ops, reads, outputs = _traced_step(engine)
        assert ops.syncs == []
        assert len(reads.reads) == 1, [name for name, _ in reads.reads]
        name, values = reads.reads[0]
        assert name == "tolist"
        tokens = [row[0] if isinstance(row, list) else row for row in values]
        assert tokens == [o.token_ids[0] for o in outputs]


def _drive_two_pools(model: DeepseekV4, lengths: list[int], steps: int) -> tuple[list, list]:
    """Two pools with the same prompts prefilled; then `steps` random tokens fed to both, through the
    per-sequence path on one and the batched decode step on the other, comparing each step's logits."""
    kv = [KVCacheManager(model, num_blocks=64, block_size=8, num_slots=len(lengths) + 1) for _ in range(2)]
    states: list[list] = [[], []]
    for i, prompt in enumerate(_prompts(lengths, seed=1)):
        for k in range(2):
            seq = Request(f"s{i}", prompt, GREEDY, seed=0, eos_token_id=None)
            kv[k].grow(seq, len(prompt) + steps)
            model.prefill(torch.tensor([prompt]), [seq.state])  # type: ignore[list-item]
            states[k].append(seq.state)
    pool = kv[1].pool
    pool.flush_block_tables()
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        tokens = torch.randint(3, 128000, (len(lengths),), generator=gen)
        per_seq = model.decode(tokens, states[0])
        rows = torch.tensor([[t, st.position, st.slot] for t, st in zip(tokens.tolist(), states[1], strict=True)])
        width = max(st.position // pool.block_size + 1 for st in states[1])
        inputs = DecodeInputs(rows, pool.block_tables[rows[:, 2], :width])
        batched = model.decode_paged(inputs.token_ids, inputs.step(pool))
        for st in states[1]:
            st.position += 1
        # the attention sums its window and entries in another order: float rounding only
        torch.testing.assert_close(batched, per_seq, atol=1e-4, rtol=0, msg=f"step {step}")
        assert torch.equal(batched.argmax(-1), per_seq.argmax(-1)), f"step {step}"
    return states[0], states[1]


def test_batched_decode_computes_what_the_per_sequence_path_computes(model: DeepseekV4) -> None:
    """Same logits and greedy tokens, and the same state in the pool (window rings, compressed entries, indexer
    keys, the compressors' live rows, entry counts), across window, compressor-block and pool-block boundaries."""
    cfg = model.cfg
    per_seq, batched = _drive_two_pools(model, [3, 4, 11, 24, 31], steps=40)
    for a, b in zip(per_seq, batched, strict=True):
        assert a.position == b.position
        for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
            m = cfg.ratio(i)
            assert la.n_entries == lb.n_entries == (a.position // m if m else 0)
            torch.testing.assert_close(lb.window, la.window, atol=1e-5, rtol=0)
            torch.testing.assert_close(lb.valid_entries(), la.valid_entries(), atol=1e-5, rtol=0)
            torch.testing.assert_close(lb.valid_index_keys(), la.valid_index_keys(), atol=1e-5, rtol=0)
            if m:
                live = (m if cfg.is_csa(i) else 0) + a.position % m
                for name in ("comp_kv", "comp_score", "icomp_kv", "icomp_score"):
                    torch.testing.assert_close(getattr(lb, name)[:live], getattr(la, name)[:live], atol=1e-5, rtol=0)


def test_graph_buckets() -> None:
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33)] == [1, 2, 4, 8, 8, 16, 16, 24, 40]
    assert [width_bucket(n, 64) for n in (1, 2, 3, 9, 64, 65)] == [1, 2, 4, 16, 64, 64]


def test_a_graph_pads_to_a_given_bucket_that_holds_its_rows(make_engine: Callable[..., LLMEngine]) -> None:
    """A data-parallel group pads to the largest group's bucket (`DecodeGraphs.run`'s `bucket`), with no rows of
    its own included; a bucket that cannot hold the rows, or is no bucket, is refused before anything runs."""
    engine = make_engine(block_size=8)
    graphs = DecodeGraphs(engine.model, engine.kv.pool, capture=False)
    none = DecodeInputs(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int32))
    assert graphs.run(none, 4).shape == (0, engine.model.cfg.vocab_size)
    assert graphs.shapes == [(4, 1)]
    three = DecodeInputs(torch.tensor([[5, 0, 0]] * 3), torch.zeros(3, 1, dtype=torch.int32))
    for bucket in (2, 3, 0):
        with pytest.raises(ValueError, match="do not pad to a bucket"):
            graphs.run(three, bucket)
    assert graphs.shapes == [(4, 1)]


def _staggered(engine: LLMEngine, params: list[SamplingParams]) -> dict[str, list[int]]:
    """Requests join two a step while others decode and finish: batches of every size up to len(params)."""
    prompts = _prompts([1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 33], seed=7)
    pending = list(enumerate(zip(prompts, params, strict=True)))
    tokens: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for i, (p, sp) in pending[:2]:
            engine.add_request(f"r{i}", p, sp)
        pending = pending[2:]
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    return tokens


def test_padded_graph_batches_give_the_same_tokens(make_engine: Callable[..., LLMEngine]) -> None:
    """The CUDA-graph path's padding and static buffers (the step runs eagerly on CPU): padding rows write only
    the sink slot and sink rows, so every request gets the tokens of the unpadded step, greedy and seeded."""
    params = [
        SamplingParams(max_tokens=4 + i % 7, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)
        for i in range(12)
    ]
    plain = _staggered(make_engine(max_num_batched_tokens=64, block_size=8), params)
    engine = make_engine(max_num_batched_tokens=64, block_size=8)
    engine.runner = ModelRunner(engine.model, cuda_graphs=True)
    assert _staggered(engine, params) == plain
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.capture
    buckets = {b for b, _ in graphs.shapes}
    widths = {w for _, w in graphs.shapes}
    assert {1, 2, 4, 8} <= buckets and len(widths) >= 3, graphs.shapes
    assert engine.kv.used_blocks == 0
