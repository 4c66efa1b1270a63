"""A one-GPU `nccl` process group through the real launcher: the rank joins with the device's backend, runs an
all-reduce and an all-gather on the GPU, and reports them (one JSON line). gpu.sh runs it; needs a CUDA device.

    python bench/nccl_smoke.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def rank_main(ctx: Any, args: list[str]) -> None:
    """Launcher target: collectives on this rank's GPU, written to args[0]."""
    import torch
    import torch.distributed as dist

    x = torch.full((1024,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(x)
    parts = [torch.empty(4, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(parts, torch.arange(4.0, device=ctx.device))
    dist.barrier()
    result = {
        "backend": dist.get_backend(),
        "device": str(ctx.device),
        "world": ctx.world_size,
        "all_reduce_ok": bool((x == sum(range(1, ctx.world_size + 1))).all()),
        "all_gather_ok": all(bool((p == torch.arange(4.0, device=ctx.device)).all()) for p in parts),
    }
    Path(args[0]).write_text(json.dumps(result))


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NODE_RANK", "NPROC_PER_NODE")}
        cmd = [sys.executable, "-m", "dsv4.model_runtime.parallel.launch", "--nproc-per-node", "1", "--device", "cuda"]
        done = subprocess.run(
            [*cmd, f"{Path(__file__).resolve()}:rank_main", str(out)],
            env=env | {"MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
        )
        result = json.loads(out.read_text()) if out.exists() else {}
    ok = done.returncode == 0 and result.get("backend") == "nccl" and result.get("all_reduce_ok") is True
    ok = ok and result.get("all_gather_ok") is True
    line = {"bench": "nccl_smoke", "ok": ok, "exit": done.returncode, **result}
    if not ok:
        line["stderr"] = done.stderr[-1500:]
    print(json.dumps(line), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
