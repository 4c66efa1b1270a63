"""Per-rank loading: how evenly a checkpoint splits over the ranks, how much memory a rank's load takes, how fast.

    python bench/sharded_load.py [--preset flash-widths] [--worlds 1,2,4] [--device cpu]

For each world size, the ranks are started through the real launcher (`dsv4.model_runtime.parallel.launch`),
each loads its shard (TP = EP = world) and reports; one JSON line per world size:
  world, max_rank_weight_bytes_ratio (largest rank's live weight bytes / (total / world)),
  peak_rss_ratio (largest (peak RSS during the load - RSS before it) / that rank's weight bytes),
  load_s (slowest rank), gbps (the slowest rank's bytes read / its load time), and the raw bytes.
The checkpoint is written once and cached (`make_checkpoint.cached_checkpoint`); the first run takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rank_main(ctx: Any, args: list[str]) -> None:
    """A launcher target: load this rank's shard and write what it cost."""
    import torch

    from dsv4.model_runtime.placement import Layout
    from dsv4.model_runtime.weights import load_rank

    torch.set_num_threads(1)
    ckpt, out = args
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: what follows is the load's
    before = _status_bytes("VmRSS")
    layout = Layout(ctx.world_size, ctx.world_size, ctx.world_size)
    model, report = load_rank(ckpt, layout, ctx.rank, ctx.device, torch.bfloat16)
    peak = _status_bytes("VmHWM")
    live = sum(t.numel() * t.element_size() for _, t in [*model.named_parameters(), *model.named_buffers()])
    result = {
        "live": live,
        "rss_before": before,
        "rss_peak": peak,
        "seconds": report.seconds,
        "bytes_read": report.bytes_read,
    }
    (Path(out) / f"rank{ctx.rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(ckpt: Path, world: int, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NODE_RANK", "NPROC_PER_NODE")}
        env |= {"MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", "--nproc-per-node", str(world)]
        cmd += ["--device", device, f"{Path(__file__).resolve()}:rank_main", str(ckpt), out]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    return {"world": world, "ranks": ranks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flash-widths")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "npu"))
    a = p.parse_args()
    from dsv4.model_runtime.checkpoint import CheckpointReader
    from dsv4.model_runtime.make_checkpoint import cached_checkpoint

    ckpt = cached_checkpoint(a.preset, quantized=True)
    with CheckpointReader(ckpt) as reader:  # every stored tensor once: what one rank holds at world 1
        total = sum(reader.entry(name).nbytes for name in reader.weight_map)
    for world in (int(w) for w in a.worlds.split(",")):
        ranks = run(ckpt, world, a.device)["ranks"]
        share = total / world
        slowest = max(ranks, key=lambda r: r["seconds"])
        print(
            json.dumps(
                {
                    "bench": "sharded_load",
                    "preset": a.preset,
                    "device": a.device,
                    "world": world,
                    "max_rank_weight_bytes_ratio": round(max(r["live"] for r in ranks) / share, 4),
                    "peak_rss_ratio": round(max((r["rss_peak"] - r["rss_before"]) / r["live"] for r in ranks), 4),
                    "peak_rss_over_share_mib": round(
                        max(r["rss_peak"] - r["rss_before"] - r["live"] for r in ranks) / 2**20, 1
                    ),
                    "load_s": round(slowest["seconds"], 2),
                    "gbps": round(slowest["bytes_read"] / slowest["seconds"] / 1e9, 3),
                    "total_weight_bytes": total,
                    "rank_weight_bytes": [r["live"] for r in ranks],
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
