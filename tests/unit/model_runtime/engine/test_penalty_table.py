"""The device table of penalized requests' context (`penalty_table.py`): what it gives always equals the penalties
built from the requests' token lists, across draws, new and finished requests, eviction, growth, a reused request
id and outputs appended behind its back; and a steady engine step uploads nothing that grows with the context."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.penalty_table import INITIAL_ROWS, PenaltyTable
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampler import Penalties
from dsv4.model_runtime.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

VOCAB = 50
CPU = torch.device("cpu")
PENALIZED = SamplingParams(max_tokens=64, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
PLAIN = SamplingParams(max_tokens=64)


def _request(name: str, params: SamplingParams, gen: torch.Generator) -> Request:
    prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
    return Request(name, prompt, params, seed=0, eos_token_id=None)


def _draw(table: PenaltyTable, seqs: list[Request], gen: torch.Generator) -> None:
    """One sampling call as the runner makes it: the table's penalties must equal the lists', then the drawn tokens
    are recorded and appended."""
    rows = table.rows(seqs)
    got, want = table.penalties(rows, seqs), Penalties.build(seqs, VOCAB, CPU)
    assert torch.equal(got.seen, want.seen) and torch.equal(got.counts, want.counts)
    assert torch.equal(got.values, want.values)
    tokens = torch.randint(0, VOCAB, (len(seqs),), generator=gen)
    table.record(rows, tokens, seqs)
    for s, t in zip(seqs, tokens.tolist(), strict=True):
        s.output_token_ids.append(t)
    assert not table.seen[table.sink].any() and not table.counts[table.sink].any()


def test_table_rows_equal_the_token_lists_through_churn_eviction_and_growth() -> None:
    gen = torch.Generator().manual_seed(0)
    table = PenaltyTable(VOCAB, CPU)
    assert table.capacity == 0  # nothing allocated before a penalized request samples
    live = [_request(f"r{i}", PENALIZED if i % 3 else PLAIN, gen) for i in range(6)]
    for step in range(40):
        _draw(table, live, gen)
        if step % 4 == 3:  # two requests finish, two start; their rows are reused once evicted
            live = live[2:] + [_request(f"n{step}-{k}", PENALIZED, gen) for k in range(2)]
    assert table.capacity == INITIAL_ROWS  # finished requests' rows were evicted, not added to
    crowd = [_request(f"c{i}", PENALIZED, gen) for i in range(3 * INITIAL_ROWS)]
    _draw(table, crowd, gen)  # more penalized rows in one call than the table has: it grows
    assert table.capacity >= 3 * INITIAL_ROWS
    for _ in range(3):
        _draw(table, crowd[::2], gen)


def test_a_reused_id_and_outputs_appended_elsewhere_refill_the_row() -> None:
    gen = torch.Generator().manual_seed(1)
    table = PenaltyTable(VOCAB, CPU)
    first = _request("same", PENALIZED, gen)
    for _ in range(3):
        _draw(table, [first], gen)
    # a new request under a finished one's id, resuming 3 outputs (a takeover): as many as the table counted
    again = _request("same", PENALIZED, gen)
    again.output_token_ids += [1, 2, 3]
    _draw(table, [again], gen)
    for _ in range(2):
        _draw(table, [first], gen)
    first.output_token_ids += [7, 7, 9]  # drawn by another path (MTP verification), not recorded here
    _draw(table, [first], gen)


def test_rows_read_ahead_of_their_lists_count_the_pending_tokens() -> None:
    """Overlapped scheduling: a call may come before the previous call's tokens reach some rows' lists (`ahead`,
    their tokens in `pending`) while others' have landed. The penalties must equal the lists' with every token
    appended, from current rows and from rows refilled after a crowd of other requests evicted them."""
    gen = torch.Generator().manual_seed(2)
    table = PenaltyTable(VOCAB, CPU)
    live = [_request(f"r{i}", PENALIZED if i % 2 else PLAIN, gen) for i in range(6)]
    rows = table.rows(live)
    pending = torch.randint(0, VOCAB, (len(live),), generator=gen)
    table.record(rows, pending, live)
    for step in range(12):
        if step == 6:
            _draw(table, [_request(f"c{i}", PENALIZED, gen) for i in range(INITIAL_ROWS)], gen)
        ahead = [(i + step) % 3 != 0 for i in range(len(live))]
        for s, t, a in zip(live, pending.tolist(), ahead, strict=True):
            if not a:  # landed before the call
                s.output_token_ids.append(t)
        rows = table.rows(live, pending, ahead)
        for s, t, a in zip(live, pending.tolist(), ahead, strict=True):
            if a:
                s.output_token_ids.append(t)
        got, want = table.penalties(rows, live), Penalties.build(live, VOCAB, CPU)
        assert torch.equal(got.seen, want.seen) and torch.equal(got.counts, want.counts), step
        drawn = torch.randint(0, VOCAB, (len(live),), generator=gen)
        table.record(rows, drawn, live)
        pending = drawn
    assert table.capacity == INITIAL_ROWS


def test_a_steady_penalized_decode_step_uploads_the_same_at_64_and_4096_tokens(
    make_engine: Callable[..., LLMEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every host-to-device copy of the engine goes through `transfer.to_device`; count the elements each step
    uploads, with penalized rows, at two context lengths."""
    uploads: list[int] = []
    for name in ("sampler", "penalty_table", "step_inputs", "model_runner"):
        module = importlib.import_module(f"dsv4.model_runtime.engine.{name}")
        if hasattr(module, "to_device"):
            real = module.to_device

            def counted(host: torch.Tensor, device: torch.device, real: Callable = real) -> torch.Tensor:
                uploads.append(host.numel())
                return real(host, device)

            monkeypatch.setattr(module, "to_device", counted)
    params = SamplingParams(max_tokens=64, temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.3)
    per_step = {}
    for context in (64, 4096):
        engine = make_engine(max_num_batched_tokens=4096)
        prompts = [
            torch.randint(3, 128000, (context - 2,), generator=torch.Generator().manual_seed(k)).tolist()
            for k in range(2)
        ]
        seqs = [engine.add_request(f"r{k}", p, params) for k, p in enumerate(prompts)]
        while any(s.num_generated < 2 for s in seqs):
            engine.step()
        uploads.clear()
        engine.step()
        per_step[context] = sum(uploads)
    assert per_step[64] == per_step[4096] < 64


def _land(live: list[Request], pending: torch.Tensor, table: PenaltyTable | None = None) -> None:
    """Append each row's pending verification draws (the second unless -1), reporting second tokens to `table`."""
    for s, (first, second) in zip(live, pending.tolist(), strict=True):
        s.output_token_ids += [first] + ([second] if second >= 0 else [])
        if table is not None and second >= 0:
            table.appended(s)


def test_verification_rows_read_ahead_count_both_pending_draws() -> None:
    """Overlapped MTP verification: a row whose previous verification has not landed is ahead by its first draw and,
    where its draft was accepted, the second (`pending` [R, 2], -1 for a rejected draft). Current rows counted
    both when they were drawn; rows refilled after a crowd evicted them count them after their lists."""
    gen = torch.Generator().manual_seed(3)
    table = PenaltyTable(VOCAB, CPU)
    live = [_request(f"v{i}", PENALIZED, gen) for i in range(4)]
    pending: torch.Tensor | None = None
    rows = table.rows(live)
    for step in range(8):
        if pending is not None:  # a launched verification: its draws are on their way
            if step in (2, 5):  # a crowd evicts the rows, which are refilled from the lists + the pending draws
                _draw(table, [_request(f"c{step}-{i}", PENALIZED, gen) for i in range(INITIAL_ROWS)], gen)
            rows = table.rows(live, pending, [True] * len(live))
            lists = [list(s.output_token_ids) for s in live]
            _land(live, pending)
            want = Penalties.build(live, VOCAB, CPU)
            for s, before in zip(live, lists, strict=True):
                s.output_token_ids[:] = before
        else:
            want = Penalties.build(live, VOCAB, CPU)
        got = table.penalties(rows, live)
        assert torch.equal(got.seen, want.seen) and torch.equal(got.counts, want.counts), step
        draws = torch.randint(0, VOCAB, (len(live), 2), generator=gen)
        accepted = torch.rand(len(live), generator=gen) < 0.5
        table.record(rows, draws[:, 0], live)
        table.record_accepted(rows, draws[:, 1], accepted)
        if pending is not None:  # the previous step lands after this one was launched
            _land(live, pending, table)
        pending = torch.stack([draws[:, 0], torch.where(accepted, draws[:, 1], -1)], dim=1)
