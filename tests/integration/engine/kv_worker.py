"""Subprocess half of the cross-process KV test: `prefill CKPT DIR` or `decode CKPT DIR` (see test_kv_handoff.py).

Both halves use the serving workers' interface (`AsyncEngine`, i.e. `model_runtime.engine.port.Engine`): the prefill
process also records what a single engine generates for each prompt, the decode process imports every blob.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch

from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.port import Engine, SamplingSpec
from dsv4.model_runtime.engine.sampling_params import SamplingParams

# Prompt lengths of every position class of tiny-flash (window 16, CSA m=4, HCA m=8): inside the window, at and
# around compression-block ends, at and past the window.
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13, 15, 16, 17, 23, 24, 25, 31, 32, 33]
MAX_TOKENS = 6


def _spec(i: int) -> SamplingSpec:
    if i % 3 == 2:
        return SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.9, top_k=50, seed=i, ignore_eos=True)
    return SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompt(n: int) -> list[int]:
    return torch.randint(3, 128000, (n,), generator=torch.Generator().manual_seed(n)).tolist()


async def prefill(ckpt: str, out: Path) -> None:
    engine = LLMEngine.from_path(ckpt)
    prompts = [_prompt(n) for n in LENGTHS]
    params = [SamplingParams.from_spec(_spec(i)) for i in range(len(LENGTHS))]
    expected = [o.token_ids for o in engine.generate_ids(prompts, params)]
    with AsyncEngine(LLMEngine(engine.model, engine.tokenizer)) as worker:
        assert isinstance(worker, Engine)
        results = await asyncio.gather(*(worker.prefill(f"r{i}", p, _spec(i)) for i, p in enumerate(prompts)))
    record = []
    for i, res in enumerate(results):
        (out / f"{i}.kv").write_bytes(b"".join(res.kv_chunks))
        record.append({"prompt": prompts[i], "first": res.first_token, "expected": expected[i]})
    (out / "prefill.json").write_text(json.dumps(record))


async def decode(ckpt: str, out: Path) -> None:
    record = json.loads((out / "prefill.json").read_text())
    with AsyncEngine.from_path(ckpt) as worker:
        for i, r in enumerate(record):
            blob = (out / f"{i}.kv").read_bytes()
            await worker.submit_decode(f"r{i}", r["prompt"], _spec(i), kv_blob=blob, streamed_ids=[r["first"]])

        async def collect(i: int) -> list[int]:
            return [record[i]["first"]] + [t.token_id async for t in worker.stream(f"r{i}")]

        tokens = await asyncio.gather(*(collect(i) for i in range(len(record))))
    (out / "decode.json").write_text(json.dumps(tokens))


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = {"prefill": prefill, "decode": decode}[sys.argv[1]]
    asyncio.run(mode(sys.argv[2], Path(sys.argv[3])))
