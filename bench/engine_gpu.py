"""Engine generation throughput on an NVIDIA GPU, in tokens/s: CUDA graphs, eager Triton, reference PyTorch.

    python bench/engine_gpu.py [--presets tiny-flash,small-flash] [--batches 1,8,32,64] [--prompt 32]
                               [--tokens 32] [--budget 110] [--out FILE]

For each preset (a random checkpoint from our writer, loaded in bf16 with the QAT simulation) and batch size B:
B prompts of P random tokens, G greedy tokens each (EOS ignored), through `LLMEngine`, in four runs: the `cuda`
backend with decode steps replayed from CUDA graphs, the same with overlapped scheduling off (`cuda+graphs-sync`),
the `cuda` backend eager, and the `reference` backend. Each run first generates 2 tokens for the same batch
(captures its graphs, compiles the Triton kernels). One JSON line per (preset, run, batch): `tok_s` is B*G over
the whole generation (prefill included, as `LLM.generate`), `decode_tok_s` B*(G-1) over the decode steps after
every request's first token; then one line per (preset, batch) with the ratios to the reference run,
`overlap_speedup` (cuda+graphs over cuda+graphs-sync) and whether each run's greedy tokens equal the reference's.
`--runs ...,reference+compile` adds the reference backend with its decode step under `torch.compile` (opt-in);
`cuda+graphs+mtp` and `reference+mtp` decode with MTP drafts (opt-in; `mtp_acceptance` in their lines).
Runs past `--budget` seconds are skipped with a line saying so.
The aims (issue #17, H200): small-flash with graphs >= 1,000 tokens/s at batch 1 and >= 15,000 at batch 64;
the cuda backend >= 3x the reference at batch 32. Needs a CUDA device; runs with only torch, triton,
safetensors and tokenizers installed (bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.weights import load_model

# run -> (kernel backend, CUDA graphs, torch.compile of the decode step, overlapped scheduling, MTP);
# `reference+compile` is opt-in (--runs): issue #17 allows torch.compile where it beats the hand-written kernels,
# and this run measures that (inductor's kernels for the reference ops, captured in the same graphs).
# `cuda+graphs-sync` is `cuda+graphs` with each step's tokens landed before the next step is launched: the
# baseline of overlapped scheduling (on by default on CUDA). The `+mtp` runs (opt-in) decode with MTP drafts,
# every step a verification step (two graphs around the sampling); the random checkpoints' MTP guesses wrong, so
# they measure what verification costs, not what accepted drafts gain. NOT RUN ON A GPU YET.
RUNS = {
    "cuda+graphs": ("cuda", True, False, True, False),
    "cuda+graphs-sync": ("cuda", True, False, False, False),
    "cuda-eager": ("cuda", False, False, True, False),
    "reference": ("reference", False, False, True, False),
    "reference+compile": ("reference", True, True, True, False),
    "cuda+graphs+mtp": ("cuda", True, False, True, True),
    "reference+mtp": ("reference", False, False, True, True),
}
DEFAULT_RUNS = ("cuda+graphs", "cuda+graphs-sync", "cuda-eager", "reference")


def _sync(model: DeepseekV4) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def generate(
    model: DeepseekV4, prompts: list[list[int]], tokens: int, graphs: bool, overlap: bool = True, mtp: bool = False
) -> dict[str, Any]:
    """Run the prompts to `tokens` greedy tokens each; whole and decode-only times (seconds), step count, the
    generated tokens and the MTP acceptance rate."""
    batch = len(prompts)
    config = EngineConfig(
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(batch * len(prompts[0]), 512),
        num_blocks=4 * batch + 8,
        cuda_graphs=graphs,
        overlap_scheduling=overlap,
        speculative_mtp=mtp,
    )
    engine = LLMEngine(model, None, config)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    _sync(model)
    start = time.perf_counter()
    seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    while any(s.num_generated < 1 for s in seqs):
        engine.step()
    _sync(model)
    first = time.perf_counter()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    _sync(model)
    end = time.perf_counter()
    tokens_out = [list(s.output_token_ids) for s in seqs]
    acceptance = engine.stats_extra()["mtp_acceptance_rate"]
    return {
        "total_s": end - start,
        "decode_s": end - first,
        "decode_steps": steps,
        "tokens": tokens_out,
        "acceptance": acceptance,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-flash,small-flash")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request (default: %(default)s)")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"of {', '.join(RUNS)} (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; later runs are skipped (%(default)s)")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--device", default="cuda", help="cpu runs the reference runs only, to check this script")
    args = ap.parse_args(argv)
    lines: list[dict[str, Any]] = []

    def emit(line: dict[str, Any]) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        emit({"bench": "engine_gpu", "error": "no CUDA device"})
        return 1
    began = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        emit({"bench": "engine_gpu", "error": f"unknown runs {unknown}; known: {list(RUNS)}"})
        return 2
    if device.type != "cuda":
        runs = [r for r in runs if RUNS[r][0] == "reference"] or ["reference"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    emit({"bench": "engine_gpu", "device": name, "torch": torch.__version__})
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            ckpt = write_checkpoint(Path(tmp) / preset, preset, quantized=True, seed=0)
            model = load_model(ckpt, device=device, dtype=torch.bfloat16, qat_simulation=True)
            results: dict[tuple[str, int], float] = {}
            outputs: dict[tuple[str, int], list[list[int]]] = {}
            eager_step = model.decode_paged
            for run in runs:
                backend, graphs, compiled, overlap, mtp = RUNS[run]
                model.bind_ops(backend)
                # the decode step only: prefill keeps its per-sequence shapes, which would recompile per length
                model.decode_paged = torch.compile(eager_step) if compiled else eager_step  # type: ignore[method-assign]
                for batch in batches:
                    common = {"bench": "engine_gpu", "preset": preset, "run": run, "batch": batch}
                    if time.perf_counter() - began > args.budget:
                        emit({**common, "skipped": f"over the {args.budget:.0f} s budget"})
                        continue
                    gen = torch.Generator().manual_seed(batch)
                    prompts = torch.randint(3, 128000, (batch, args.prompt), generator=gen).tolist()
                    try:
                        generate(model, prompts, 2, graphs, overlap, mtp)  # warm-up: graphs captured, kernels compiled
                        t = generate(model, prompts, args.tokens, graphs, overlap, mtp)
                    except Exception as e:  # one failing run must not hide the others' numbers
                        emit({**common, "error": repr(e)[:500]})
                        continue
                    tok_s = batch * args.tokens / t["total_s"]
                    decode_tok_s = batch * (args.tokens - 1) / t["decode_s"]
                    results[(run, batch)] = decode_tok_s
                    outputs[(run, batch)] = t["tokens"]
                    emit(
                        {
                            **common,
                            "prompt": args.prompt,
                            "tokens": args.tokens,
                            "tok_s": round(tok_s, 1),
                            "decode_tok_s": round(decode_tok_s, 1),
                            "ms_per_decode_step": round(t["decode_s"] / max(1, t["decode_steps"]) * 1e3, 3),
                            **({"mtp_acceptance": round(t["acceptance"], 3)} if mtp else {}),
                        }
                    )
            for batch in batches:
                ref = results.get(("reference", batch))
                ratios = {
                    f"{run}/reference": round(results[(run, batch)] / ref, 2)
                    for run in runs
                    if run != "reference" and ref and (run, batch) in results
                }
                # greedy tokens equal to the reference run's (bf16: a near tie may flip one and what follows)
                same = {
                    f"{run}/reference": outputs[(run, batch)] == outputs[("reference", batch)]
                    for run in runs
                    if run != "reference" and (run, batch) in outputs and ("reference", batch) in outputs
                }
                overlapped, synced = results.get(("cuda+graphs", batch)), results.get(("cuda+graphs-sync", batch))
                overlap = {"overlap_speedup": round(overlapped / synced, 2)} if overlapped and synced else {}
                if ratios:
                    emit(
                        {
                            "bench": "engine_gpu",
                            "preset": preset,
                            "batch": batch,
                            "decode_speedup": ratios,
                            **overlap,
                            "same_tokens": same,
                        }
                    )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
