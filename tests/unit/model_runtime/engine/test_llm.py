"""The public entry point of DESIGN §2: `LLM(path, device="cpu").generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv4.model_runtime import LLM, SamplingParams

pytestmark = pytest.mark.unit


def test_generate_and_stream(flash_ckpt: Path) -> None:
    llm = LLM(flash_ckpt, device="cpu", max_num_seqs=4)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outs = llm.generate(["hello", "The quick brown fox"], params)
    assert len(outs) == 2
    for out, prompt in zip(outs, ["hello", "The quick brown fox"], strict=True):
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert 1 <= len(out.token_ids) <= 16
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert llm.generate("hello", params)[0].token_ids == outs[0].token_ids
    assert llm.generate(llm.tokenizer.encode("hello"), params)[0].token_ids == outs[0].token_ids
    pieces: dict[int, list[str]] = {0: [], 1: []}
    ids: dict[int, list[int]] = {0: [], 1: []}
    for i, delta in llm.stream(["hello", "The quick brown fox"], params):
        pieces[i].append(delta.text)
        ids[i].extend(delta.token_ids)
    for i, out in enumerate(outs):
        assert ids[i] == out.token_ids and "".join(pieces[i]) == out.text
