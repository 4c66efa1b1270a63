"""MTP across a KV handoff and a prefix-cache hit: the MTP layers' state (and, in a blob, the MTP's draft) travels
with the state, so the importing or resuming sequence goes on drafting, with drafts that are the MTP's prediction of
the whole sequence, and the tokens of plain decoding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.kv_export import KVFormatError, export_state, load
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

from .test_kv_export import _rewrite_header
from .test_mtp import OracleRunner

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [(37 * k + 11) % 128000 for k in range(21)]


def _export(engine: LLMEngine, prompt: list[int]) -> tuple[int, bytes]:
    seq = engine.add_request("p", prompt, GREEDY, export_after_prefill=True)
    while not seq.finished:
        engine.step()
    assert seq.state is not None
    blob = export_state(engine.model, seq.state, draft=seq.draft)
    engine.release(seq)
    return seq.output_token_ids[0], blob


def _check_drafts(model: DeepseekV4, tokens: list[int], drafts: dict[int, int]) -> None:
    """Each draft (keyed by the position it predicts) is the MTP's prediction over the whole sequence."""
    state = model.new_state()
    with torch.no_grad():
        streams = model.hidden_streams(torch.tensor([tokens]), [state])
        logits = model.mtp_logits(streams[:, :-1], torch.tensor([tokens[1:]]), [state])[0]
    for position, draft in drafts.items():
        assert int(torch.argmax(logits[position - 2])) == draft, f"draft for position {position}"


def test_an_imported_state_goes_on_drafting_with_the_mtp_it_carries(make_engine: Callable[..., LLMEngine]) -> None:
    expected = make_engine().generate_ids([PROMPT], GREEDY)[0].token_ids
    first, blob = _export(make_engine(max_num_batched_tokens=8, speculative_mtp=True), PROMPT)
    header, _ = kv_export.read_header(blob)
    assert header["mtp_layers"] == 1 and isinstance(header["mtp_draft"], int)
    assert [s["name"] for s in header["sections"] if s["name"].startswith("mtp.")] == [
        "mtp.0.window.fp8",
        "mtp.0.window.scale",
        "mtp.0.window.rope",
    ]
    engine = make_engine(speculative_mtp=True)
    runner = OracleRunner(engine.model, {"d": expected})
    engine.runner = runner
    snapshot = load(engine.model, blob)
    assert snapshot.mtp_layers == 1
    seq = engine.add_request("d", PROMPT, GREEDY, output_token_ids=[first], snapshot=snapshot)
    assert seq.use_mtp and seq.draft == snapshot.mtp_draft
    engine.step()  # the first decode step verifies the draft the blob carried (not a feed of token 0 alone)
    assert runner.drafts.proposed == 1
    while not seq.finished:
        engine.step()
    assert seq.output_token_ids == expected
    assert 0 < runner.drafts.accepted < runner.drafts.proposed
    # the carried draft, then every draft the MTP made here: its prediction over the whole sequence
    _check_drafts(engine.model, PROMPT + expected, {len(PROMPT) + 1: snapshot.mtp_draft, **runner.mtp_drafts["d"]})


def test_a_state_without_an_mtp_cache_decodes_without_drafts(make_engine: Callable[..., LLMEngine]) -> None:
    """Exported by an engine without MTP: no MTP sections; imported into an MTP engine, it decodes plainly."""
    expected = make_engine().generate_ids([PROMPT], GREEDY)[0].token_ids
    first, blob = _export(make_engine(), PROMPT)
    header, _ = kv_export.read_header(blob)
    assert header["mtp_layers"] == 0 and header["mtp_draft"] is None
    assert not any(s["name"].startswith("mtp.") for s in header["sections"])
    engine = make_engine(speculative_mtp=True)
    seq = engine.add_request("d", PROMPT, GREEDY, output_token_ids=[first], snapshot=load(engine.model, blob))
    assert not seq.use_mtp
    while not seq.finished:
        engine.step()
    assert seq.output_token_ids == expected and engine.runner.drafts.proposed == 0


def test_mtp_fields_the_model_cannot_use_are_refused(make_engine: Callable[..., LLMEngine]) -> None:
    _, blob = _export(make_engine(speculative_mtp=True), PROMPT)
    model = make_engine().model
    for bad in (2, -1, "1", True):
        with pytest.raises(KVFormatError, match="MTP layers"):
            load(model, _rewrite_header(blob, lambda h, v=bad: h.update(mtp_layers=v)))
    for bad_draft in (model.cfg.vocab_size, -1, "5", True):
        with pytest.raises(KVFormatError, match="mtp_draft"):
            load(model, _rewrite_header(blob, lambda h, v=bad_draft: h.update(mtp_draft=v)))
    # a blob of the earlier format, without the fields, is a state without an MTP cache; a draft needs the MTP state
    _, plain = _export(make_engine(), PROMPT)
    old = load(model, _rewrite_header(plain, lambda h: (h.pop("mtp_layers"), h.pop("mtp_draft"))))
    assert (old.mtp_layers, old.mtp_draft) == (0, None)
    with pytest.raises(KVFormatError, match="mtp_draft"):
        load(model, _rewrite_header(plain, lambda h: h.update(mtp_draft=5)))


def test_a_prefix_cache_hit_goes_on_drafting(make_engine: Callable[..., LLMEngine]) -> None:
    """The cache's snapshots hold the MTP layers' state when the MTP had caught up: a request resuming from one
    drafts from its first decode step on, and its drafts are the MTP's prediction of its whole sequence."""
    system = [(13 * k + 5) % 128000 for k in range(20)]
    prompts = [[*system, 900 + i, 901 + i, 902 + i] for i in range(3)]
    plain = make_engine()
    expected = [plain.generate_ids([p], GREEDY)[0].token_ids for p in prompts]
    engine = make_engine(prefix_cache=True, block_size=8, max_num_batched_tokens=16, speculative_mtp=True)
    runner = OracleRunner(engine.model, {f"r{i}": e for i, e in enumerate(expected)})
    engine.runner = runner
    for i, p in enumerate(prompts):
        seq = engine.add_request(f"r{i}", p, GREEDY)
        while not seq.finished:
            engine.step()
        assert seq.output_token_ids == expected[i]
        assert seq.use_mtp, f"request {i} lost its MTP on a cache hit"
        _check_drafts(engine.model, p + expected[i], runner.mtp_drafts[f"r{i}"])
    assert engine.stats_extra()["prefix_cache_hits"] >= 2
    assert engine.kv.used_blocks == 0
