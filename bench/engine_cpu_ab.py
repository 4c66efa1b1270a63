"""CPU engine throughput of this tree against another git revision, in the same run (A/B, alternating).

    .venv/bin/python bench/engine_cpu_ab.py --ref main [--preset tiny-flash] [--batches 1,8,32] [--prompt 32]
                                            [--tokens 16] [--repeats 3] [--qat] [--mtp]

`git archive REF` is unpacked into a temporary folder and imported through a farm of links (as bench/gpu.sh
does), so both trees run the same measurement as `bench/engine_cpu.py` (LLMEngine.generate_ids of B greedy
prompts, one torch thread) on the same checkpoint, in child processes that alternate A, B, B, A, ... per repeat.
One JSON line per (tree, repeat, batch), then per batch the medians and the ratio this tree / REF.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.weights import load_model
ckpt, batches, prompt, tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = load_model(ckpt, qat_simulation=sys.argv[5] == "1")
config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, speculative_mtp=sys.argv[6] == "1")
params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
LLMEngine(model, None, config).generate_ids([[5] * 8], SamplingParams(max_tokens=2, temperature=0.0))
for batch in batches:
    prompts = torch.randint(3, 128000, (batch, prompt), generator=torch.Generator().manual_seed(batch)).tolist()
    engine = LLMEngine(model, None, config)
    start = time.perf_counter()
    engine.generate_ids(prompts, params)
    print(json.dumps({"batch": batch, "tok_s": batch * tokens / (time.perf_counter() - start)}), flush=True)
"""


def _tree(ref: str, into: Path) -> Path:
    """The link farm of `ref`'s packages (dsv4/<folder> -> <folder>), ready for PYTHONPATH."""
    into.mkdir(parents=True)
    archive = into / "tree.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", ref], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    farm = into / "path" / "dsv4"
    farm.mkdir(parents=True)
    for d in ("kernels", "model_runtime", "protocol"):
        (farm / d).symlink_to(into / "src" / d)
    return farm.parent


def _working_tree() -> Path:
    """The link farm of this working tree (uncommitted edits included), under build/."""
    farm = ROOT / "build" / "ab-path" / "dsv4"
    farm.mkdir(parents=True, exist_ok=True)
    for d in ("kernels", "model_runtime", "protocol"):
        if not (farm / d).is_symlink():
            (farm / d).symlink_to(ROOT / d)
    return farm.parent


def _run(pythonpath: Path, ckpt: Path, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", CHILD, str(ckpt), json.dumps(args.batch_list), str(args.prompt), str(args.tokens)]
    flags = ["1" if args.qat else "0", "1" if args.mtp else "0"]
    out = subprocess.run([*cmd, *flags], env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the git revision to compare against")
    ap.add_argument("--preset", default="tiny-flash")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qat", action="store_true", help="run the QAT simulation (engine_cpu.py runs without)")
    ap.add_argument("--mtp", action="store_true", help="decode with MTP speculative decoding in both trees")
    args = ap.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    from dsv4.model_runtime.make_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, quantized=True, seed=0)
        trees = {"this": _working_tree(), args.ref: _tree(args.ref, Path(tmp) / "ref")}
        results: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batch_list} for name in trees}
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for name in order:
                for line in _run(trees[name], ckpt, args):
                    results[name][line["batch"]].append(line["tok_s"])
                    print(json.dumps({"bench": "engine_cpu_ab", "tree": name, "repeat": repeat, **line}), flush=True)
        for b in args.batch_list:
            this, ref = statistics.median(results["this"][b]), statistics.median(results[args.ref][b])
            summary = {"bench": "engine_cpu_ab", "preset": args.preset, "batch": b, "qat": args.qat, "mtp": args.mtp}
            summary |= {"this_tok_s": round(this, 1), f"{args.ref}_tok_s": round(ref, 1), "ratio": round(this / ref, 2)}
            print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
