"""Rank groups on one machine: greedy generation tokens/s of the group engine per layout, against one process.

    python bench/rank_groups.py [--preset tiny-flash] [--layouts 1,tp2,dp2,tp2xdp2] [--batches 1,8] [--prompt 32]
                                [--tokens 16] [--reps 2]

For each layout the ranks are started through the real launcher (`dsv4.model_runtime.parallel.launch`), every rank
builds its part of the engine (`parallel/engine_group.load_rank_engine`, fp32, one thread per rank) and the leader
times `generate_ids` of `batch` random prompts (after one warm-up batch), best of `--reps`; "1" is the same engine
in one process (a group of one rank, so the step channel's cost is in it too). Layouts: "tpN" (N ranks of tensor
parallel), "dpN" (N groups of one rank, experts split over them), "tpNxdpM". One JSON line per (layout, batch):
tokens_per_s, and ratio = that / the one-rank line of the same batch in the same run.

On a CPU these runs measure what the group costs, not what it saves: the ranks share the same cores and gloo
carries the collectives over loopback. The checkpoint is written once and cached (`cached_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def rank_main(ctx: Any, args: list[str]) -> None:
    """A launcher target: build this rank's part of the engine; the leader times the batches and writes them."""
    import torch

    from dsv4.model_runtime.engine.llm_engine import EngineConfig
    from dsv4.model_runtime.engine.sampling_params import SamplingParams
    from dsv4.model_runtime.parallel.engine_group import load_rank_engine
    from dsv4.model_runtime.placement import Layout

    torch.set_num_threads(1)
    ckpt, tp, batches, prompt, tokens, reps, out = args
    world = ctx.world_size
    layout = Layout(world=world, tp=int(tp), ep=world if world > int(tp) else 1)
    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048)
    part = load_rank_engine(ctx, ckpt, layout, config=config)
    if not part.is_leader:
        part.follow()
        return
    engine = part.engine
    params = SamplingParams(max_tokens=int(tokens), temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for batch in (int(b) for b in batches.split(",")):
        prompts = [torch.randint(3, 128000, (int(prompt),), generator=gen).tolist() for _ in range(batch)]
        engine.generate_ids(prompts, params)  # warm-up
        best = 0.0
        for _ in range(int(reps)):
            start = time.perf_counter()
            done = engine.generate_ids(prompts, params)
            seconds = time.perf_counter() - start
            best = max(best, sum(len(c.token_ids) for c in done) / seconds)
        results[batch] = best
    part.stop()
    (Path(out) / "result.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layout(name: str) -> tuple[int, int]:
    """(world, tp) of "1", "tpN", "dpN" or "tpNxdpM"."""
    if name == "1":
        return 1, 1
    tp, dp = 1, 1
    for part in name.split("x"):
        if part.startswith("tp"):
            tp = int(part[2:])
        elif part.startswith("dp"):
            dp = int(part[2:])
        else:
            raise SystemExit(f"layout {name!r}: expected 1, tpN, dpN or tpNxdpM")
    return tp * dp, tp


def _run(ckpt: Path, name: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    world, tp = _layout(name)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NODE_RANK", "NPROC_PER_NODE")}
    env |= {"MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    target = f"{Path(__file__).resolve()}:rank_main"
    cmd = [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", "--nproc-per-node", str(world), target]
    cmd += [str(ckpt), str(tp), args.batches, str(args.prompt), str(args.tokens), str(args.reps), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"layout {name}: the group failed:\n{done.stderr[-3000:]}")
    return dict(json.loads((out / "result.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-flash")
    parser.add_argument("--layouts", default="1,tp2,dp2,tp2xdp2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from dsv4.model_runtime.make_checkpoint import cached_checkpoint

    ckpt = cached_checkpoint(args.preset, quantized=True, seed=0)
    layouts = args.layouts.split(",")
    if "1" not in layouts:
        layouts.insert(0, "1")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: _run(ckpt, name, args, Path(tmp) / name) for name in layouts}
    for name in layouts:
        for batch, tps in results[name].items():
            base = results["1"][batch]
            line = {"bench": "rank_groups", "preset": args.preset, "layout": name, "world": _layout(name)[0]}
            line |= {"batch": int(batch), "tokens_per_s": round(tps, 1), "ratio": round(tps / base, 3)}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
