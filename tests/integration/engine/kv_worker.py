"""Subprocess half of the cross-process KV test: `prefill CKPT DIR` or `decode CKPT DIR` (see test_kv_handoff.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dsv4.model_runtime.engine.kv_export import export_state, load
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams

# Prompt lengths of every position class of tiny-flash (window 16, CSA m=4, HCA m=8): inside the window, at and
# around compression-block ends, at and past the window.
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33]
MAX_TOKENS = 6


def _params(i: int) -> SamplingParams:
    if i % 3 == 2:
        return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=50, seed=i, ignore_eos=True)
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompt(n: int) -> list[int]:
    return torch.randint(3, 128000, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def prefill(ckpt: str, out: Path) -> None:
    engine = LLMEngine.from_path(ckpt)
    prompts = [_prompt(n) for n in LENGTHS]
    params = [_params(i) for i in range(len(LENGTHS))]
    expected = [o.token_ids for o in engine.generate_ids(prompts, params)]
    seqs = [
        engine.add_request(f"p{i}", p, sp, export_after_prefill=True)
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
    ]
    while engine.has_unfinished():
        engine.step()
    record = []
    for i, seq in enumerate(seqs):
        assert seq.state is not None
        (out / f"{i}.kv").write_bytes(export_state(engine.model, seq.state))
        engine.release(seq)
        record.append({"prompt": prompts[i], "first": seq.output_token_ids[0], "expected": expected[i]})
    (out / "prefill.json").write_text(json.dumps(record))


def decode(ckpt: str, out: Path) -> None:
    engine = LLMEngine.from_path(ckpt)
    record = json.loads((out / "prefill.json").read_text())
    seqs = []
    for i, r in enumerate(record):
        snapshot = load(engine.model, (out / f"{i}.kv").read_bytes())
        seqs.append(
            engine.add_request(f"d{i}", r["prompt"], _params(i), output_token_ids=[r["first"]], snapshot=snapshot)
        )
    while engine.has_unfinished():
        engine.step()
    (out / "decode.json").write_text(json.dumps([s.output_token_ids for s in seqs]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"prefill": prefill, "decode": decode}[sys.argv[1]](sys.argv[2], Path(sys.argv[3]))
