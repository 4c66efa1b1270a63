"""CPU throughput of the dsv4 runtime against transformers 5.23.0 on the same weights, in the same run.

For each preset and batch size: prefill tokens/s (a P-token prompt per row) and decode tokens/s (N single-token
steps per row over the incremental state / transformers' DynamicCache), best of --reps interleaved repetitions.
Prints one JSON line per (preset, batch, implementation) and one line with the ratios dsv4 / transformers.

    .venv/bin/python bench/runtime_cpu.py [--presets tiny-flash,small-flash] [--batches 1,8] [--prompt 64]
                                          [--decode 16] [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the transformers oracle is a test helper, not in the wheel: from the checkout

from dsv4.model_runtime import load_model  # noqa: E402
from dsv4.model_runtime.make_checkpoint import write_checkpoint  # noqa: E402
from tests.unit.model_runtime.model.transformers_oracle import load_transformers_oracle  # noqa: E402


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_dsv4(model: Any, ids: torch.Tensor, steps: torch.Tensor) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one prompt batch then len(steps) decode steps."""
    b, p = ids.shape
    states = [model.new_state() for _ in range(b)]
    t_prefill = _timed(lambda: model.prefill(ids, states, last_only=True))

    def decode() -> None:
        for step in steps:
            model.decode(step, states)

    return b * p / t_prefill, b * len(steps) / _timed(decode)


@torch.no_grad()
def run_transformers(model: Any, ids: torch.Tensor, steps: torch.Tensor) -> tuple[float, float]:
    from transformers import DynamicCache

    b, p = ids.shape
    cache = DynamicCache(config=model.config)
    t_prefill = _timed(lambda: model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1))

    def decode() -> None:
        for step in steps:
            model(step[:, None], past_key_values=cache, use_cache=True)

    return b * p / t_prefill, b * len(steps) / _timed(decode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-flash,small-flash")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (default: %(default)s)")
    ap.add_argument("--decode", type=int, default=16, help="decode steps (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, best kept (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            print(f"writing {preset} checkpoint ...", file=sys.stderr)
            ckpt = write_checkpoint(Path(tmp) / preset, preset, quantized=True, seed=0)
            impls: dict[str, tuple[Any, Callable[[Any, torch.Tensor, torch.Tensor], tuple[float, float]]]] = {
                "dsv4": (load_model(ckpt, qat_simulation=False), run_dsv4),
                "dsv4_qat": (load_model(ckpt, qat_simulation=True), run_dsv4),
                "transformers": (load_transformers_oracle(ckpt), run_transformers),
            }
            for batch in (int(b) for b in args.batches.split(",")):
                ids = torch.randint(2, 129280, (batch, args.prompt), generator=torch.Generator().manual_seed(0))
                steps = torch.randint(2, 129280, (args.decode, batch), generator=torch.Generator().manual_seed(1))
                common = {
                    "bench": "runtime_cpu",
                    "preset": preset,
                    "batch": batch,
                    "prompt": args.prompt,
                    "decode_steps": args.decode,
                    "threads": args.threads,
                    "reps": args.reps,
                }
                for model, run in impls.values():
                    run(model, ids[:, :8], steps[:2])  # warm-up
                best = {name: (0.0, 0.0) for name in impls}
                for _ in range(args.reps):  # interleaved, best of reps: the machine's load hits every impl alike
                    for name, (model, run) in impls.items():
                        prefill, decode = run(model, ids, steps)
                        best[name] = (max(best[name][0], prefill), max(best[name][1], decode))
                for name, (prefill, decode) in best.items():
                    line = {
                        **common,
                        "impl": name,
                        "prefill_tok_s": round(prefill, 1),
                        "decode_tok_s": round(decode, 1),
                    }
                    print(json.dumps(line), flush=True)
                base, ours = best["transformers"], best["dsv4"]
                ratio = {"prefill_ratio": round(ours[0] / base[0], 2), "decode_ratio": round(ours[1] / base[1], 2)}
                print(json.dumps({**common, "impl": "dsv4/transformers", **ratio}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
