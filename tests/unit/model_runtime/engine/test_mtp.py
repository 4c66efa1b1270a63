"""MTP speculative decoding: the same tokens as plain decoding, whatever the drafts; drafts aligned with the MTP."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.model_runner import ModelRunner
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

pytestmark = pytest.mark.unit

LENGTHS = [1, 9, 16, 33]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 128000, (n,), generator=gen).tolist() for n in LENGTHS]


class OracleRunner(ModelRunner):
    """Keeps the MTP module in step but replaces its drafts: the true next token every other time, else a wrong
    one; records each MTP draft with the position it predicts."""

    def __init__(self, model: DeepseekV4, truth: dict[str, list[int]], cuda_graphs: bool = False) -> None:
        super().__init__(model, use_mtp=True, cuda_graphs=cuda_graphs)
        self.truth, self.turn = truth, 0
        self.mtp_drafts: dict[str, dict[int, int]] = {}

    def _propose(self, s: Request, draft: int) -> None:
        self.mtp_drafts.setdefault(s.request_id, {})[s.num_tokens] = draft
        truth = self.truth[s.request_id]
        right = truth[s.num_generated] if s.num_generated < len(truth) else 0
        self.turn += 1
        s.draft = right if self.turn % 2 else (right + 1) % 128000


def _run(engine: LLMEngine, params: SamplingParams) -> dict[str, list[int]]:
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(_prompts())]
    while engine.has_unfinished():
        engine.step()
    return {s.request_id: s.output_token_ids for s in seqs}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_same_tokens_with_and_without_mtp(params: SamplingParams, make_engine: Callable[..., LLMEngine]) -> None:
    plain = _run(make_engine(max_num_batched_tokens=8), params)
    engine = make_engine(max_num_batched_tokens=8, speculative_mtp=True)
    assert _run(engine, params) == plain
    assert engine.runner.drafts.proposed > 0
    oracle_engine = make_engine(max_num_batched_tokens=8, speculative_mtp=True)
    oracle = OracleRunner(oracle_engine.model, plain)
    oracle_engine.runner = oracle
    assert _run(oracle_engine, params) == plain
    stats = oracle.drafts
    assert 0 < stats.accepted < stats.proposed
    assert stats.accepted >= stats.proposed // 2 - len(LENGTHS), "every right draft is accepted"
    stats_line = oracle_engine.stats_extra()
    assert stats_line["mtp_drafts_proposed"] == stats.proposed
    assert stats_line["mtp_acceptance_rate"] == pytest.approx(stats.accepted / stats.proposed)


def test_drafts_are_the_mtp_prediction_of_the_full_sequence(make_engine: Callable[..., LLMEngine]) -> None:
    """The MTP followed incrementally (chunked prefill, verify steps, rollbacks) predicts what it predicts when
    run once over the whole sequence: its inputs are aligned with the main model's positions."""
    plain = _run(make_engine(), GREEDY)
    engine = make_engine(max_num_batched_tokens=8, speculative_mtp=True)
    runner = OracleRunner(engine.model, plain)
    engine.runner = runner
    _run(engine, GREEDY)
    model = engine.model
    for i, prompt in enumerate(_prompts()):
        rid = f"r{i}"
        tokens = prompt + plain[rid]
        state = model.new_state()
        with torch.no_grad():
            streams = model.hidden_streams(torch.tensor([tokens]), [state])
            logits = model.mtp_logits(streams[:, :-1], torch.tensor([tokens[1:]]), [state])[0]  # predicts t + 2
        for position, draft in runner.mtp_drafts[rid].items():
            assert int(torch.argmax(logits[position - 2])) == draft, f"{rid}: draft for position {position}"


def test_mtp_under_preemption(make_engine: Callable[..., LLMEngine]) -> None:
    plain = _run(make_engine(), GREEDY)
    engine = make_engine(num_blocks=8, block_size=8, max_num_batched_tokens=16, speculative_mtp=True)
    assert _run(engine, GREEDY) == plain
    assert engine.stats_extra()["preemptions"] > 0
    assert engine.kv.used_blocks == 0
