"""One rank of a sharded model run (a launcher target): load this rank's shard, measure it, run the model.

args: checkpoint, layout ("tp,ep"), token ids file (.pt), output folder. Writes rank<r>.pt with the logits of a
prefill of all tokens but the last (every position) and of the decode step of the last one, what the loader read,
the live bytes of the weights by dtype, and the RSS before and at the peak of the load (VmHWM reset before
loading). Under data-parallel attention (tp < world) data-parallel group g runs rows g, g + dp, ... of the ids
(`rows` in the output), so the groups run different batches of different sizes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from dsv4.model_runtime.parallel.data_parallel import DataParallel
from dsv4.model_runtime.parallel.rank import RankContext
from dsv4.model_runtime.placement import Layout
from dsv4.model_runtime.weights import load_rank


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(ctx: RankContext, args: list[str]) -> None:
    ckpt, layout_arg, ids_file, out = args
    torch.set_num_threads(1)
    tp, ep = (int(v) for v in layout_arg.split(","))
    layout = Layout(world=ctx.world_size, tp=tp, ep=ep)
    ids = torch.load(ids_file)
    rows = list(range(ids.shape[0]))
    dp = DataParallel.create(layout, ctx.rank) if layout.dp > 1 else None
    if dp is not None:
        rows = rows[dp.group :: layout.dp]
        sizes = [len(range(g, ids.shape[0], layout.dp)) for g in range(layout.dp)]
    ids = ids[rows]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the load's
    rss_before = _status_kb("VmRSS") * 1024
    model, report = load_rank(ckpt, layout, ctx.rank, ctx.device, torch.float32, data_parallel=dp)
    peak = _status_kb("VmHWM") * 1024
    tensors = [*model.named_parameters(), *model.named_buffers()]
    by_dtype: Counter[str] = Counter()
    for _, t in tensors:
        by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    states = [model.new_state() for _ in range(ids.shape[0])]
    if dp is not None:  # the MoE's exchange counts tokens: rows x positions
        dp.set_rows([n * (ids.shape[1] - 1) for n in sizes])
    prefill = model.prefill(ids[:, :-1], states)
    if dp is not None:
        dp.set_rows(sizes)
    step = model.decode(ids[:, -1], states)
    torch.save(
        {
            "rows": rows,
            "prefill": prefill,
            "step": step,
            "pieces": {n: (p.axis, p.start, p.stop) for n, p in report.pieces.items()},
            "skipped": report.skipped,
            "bytes_by_dtype": dict(by_dtype),
            "rss_before": rss_before,
            "rss_peak": peak,
            "bytes_read": report.bytes_read,
            "load_seconds": report.seconds,
            "fingerprint_lines": model.weight_signature,
        },
        Path(out) / f"rank{ctx.rank}.pt",
    )
