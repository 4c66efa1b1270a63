"""One rank of a tensor/expert-parallel run (launched by test_tp_ep.py with torchrun-style env variables)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsv4.model_runtime.parallel import ParallelConfig, backend_for, load_parallel_model


def main(ckpt: str, mode: str, ids_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend_for("cpu"))
    pc = ParallelConfig.from_process_group(tp=mode in ("tp", "tp+ep"), ep=mode in ("ep", "tp+ep"))
    model, log = load_parallel_model(ckpt, pc)
    ids = torch.load(ids_file)
    full = model(ids)
    states = [model.new_state() for _ in range(ids.shape[0])]
    model.prefill(ids[:, :-1], states)
    step = model.decode(ids[:, -1], states)
    torch.save(
        {"full": full, "step": step, "read": log.full, "sliced": log.sliced, "skipped": log.skipped},
        Path(out_dir) / f"rank{pc.rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
