"""End-to-end generation throughput of the engine against transformers' `generate`, same weights, same run.

For each batch size: B prompts of P tokens, G greedy tokens each (EOS ignored). dsv4 runs them through
`LLMEngine` (continuous batching, paged KV; float semantics, like transformers) and, optionally, with MTP
speculative decoding; transformers runs `DeepseekV4ForCausalLM.generate` on the same checkpoint. One JSON line
per (batch, implementation) with output tokens/s, then one with the ratio dsv4 / transformers and the share of
identical greedy tokens.

    .venv/bin/python bench/engine_cpu.py [--preset tiny-flash] [--batches 1,2,4,8,16,32] [--prompt 32]
                                         [--tokens 16] [--threads 1] [--mtp]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the transformers oracle is a test helper, not in the wheel: from the checkout

from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from dsv4.model_runtime.engine.sampling_params import SamplingParams  # noqa: E402
from dsv4.model_runtime.make_checkpoint import write_checkpoint  # noqa: E402
from dsv4.model_runtime.weights import load_model  # noqa: E402
from tests.unit.model_runtime.model.transformers_oracle import load_transformers_oracle  # noqa: E402


def run_dsv4(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate_ids(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


@torch.no_grad()
def run_transformers(model: object, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(  # type: ignore[attr-defined]
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=1,
    )
    return time.perf_counter() - start, out[:, ids.shape[1] :].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-flash")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per request (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--mtp", action="store_true", help="also run dsv4 with MTP speculative decoding")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.preset} checkpoint ...", file=sys.stderr)
        ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, quantized=True, seed=0)
        model = load_model(ckpt, qat_simulation=False)
        oracle = load_transformers_oracle(ckpt)
        variants = {"dsv4": EngineConfig(max_num_seqs=32, max_num_batched_tokens=1024)}
        if args.mtp:
            variants["dsv4_mtp"] = EngineConfig(max_num_seqs=32, max_num_batched_tokens=1024, speculative_mtp=True)
        warm = [[5] * 8]
        for config in variants.values():
            run_dsv4(LLMEngine(model, None, config), warm, 2)
        run_transformers(oracle, warm, 2)
        for batch in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, 128000, (batch, args.prompt), generator=gen).tolist()
            common = {"bench": "engine_cpu", "preset": args.preset, "batch": batch, "prompt": args.prompt}
            common |= {"tokens": args.tokens, "threads": args.threads}
            results: dict[str, tuple[float, list[list[int]]]] = {}
            for name, config in variants.items():
                engine = LLMEngine(model, None, config)
                results[name] = run_dsv4(engine, prompts, args.tokens)
                extra = engine.stats_extra()
                line = {**common, "impl": name, "tok_s": round(batch * args.tokens / results[name][0], 1)}
                if config.speculative_mtp:
                    line["mtp_acceptance_rate"] = round(extra["mtp_acceptance_rate"], 3)
                print(json.dumps(line), flush=True)
            results["transformers"] = run_transformers(oracle, prompts, args.tokens)
            tf_time, tf_tokens = results["transformers"]
            print(json.dumps({**common, "impl": "transformers", "tok_s": round(batch * args.tokens / tf_time, 1)}))
            same = sum(
                a == b for x, y in zip(results["dsv4"][1], tf_tokens, strict=True) for a, b in zip(x, y, strict=True)
            )
            ratio = {
                "ratio": round(tf_time / results["dsv4"][0], 2),
                "same_greedy_tokens": same / (batch * args.tokens),
            }
            print(json.dumps({**common, "impl": "dsv4/transformers", **ratio}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
