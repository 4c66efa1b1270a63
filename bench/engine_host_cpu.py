"""The engine's host work per decode step, next to the model's forward in the same steps; JSON lines.

On a GPU the decode step's kernels run asynchronously (replayed from a graph), so what the host does between two
steps (scheduling, building the step's inputs, launching the sampler, reading the tokens back, appending them and
making the outputs) is time the GPU waits, unless it is shorter than the step. This measures it on the CPU, where
the same Python runs: B greedy requests decoding, each step timed whole and split into the scheduler's
`schedule`, the model's forward (`ModelRunner.forward_decode`), the sampling call (`sample_batch`) and the rest.
`host_ms` = schedule + rest: the part that stays on the host on any device (the rest includes the CPU time of
the small tensor ops around the step, which a GPU runs asynchronously); `host_per_forward` = host_ms / forward_ms
(the forward here is CPU compute; the line shows how host work grows with the batch against it). A second line
per batch (`"stubbed": true`) measures the same steps with the forward and the sampling call replaced by
returning fixed tensors: the engine's own Python alone.

    .venv/bin/python bench/engine_host_cpu.py [--preset tiny-flash] [--batches 1,32,64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsv4.model_runtime.engine import model_runner
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.weights import load_model


class _Clock:
    """Seconds spent inside wrapped callables."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def measure(engine: LLMEngine, batch: int, steps: int, stubbed: bool = False) -> dict[str, Any]:
    """`steps` decode steps of `batch` greedy requests (every request decoding in each step); `stubbed`: the
    forward and the sampling call return fixed tensors."""
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(f"b{batch}-{i}", list(range(5, 37 + i % 16)), params) for i in range(batch)]
    while any(s.num_generated < 2 for s in seqs):
        engine.step()
    clocks = {name: _Clock() for name in ("schedule", "forward", "sample")}
    scheduler, runner = engine.scheduler, engine.runner
    real_sample = model_runner.sample_batch
    forward, sample = runner.forward_decode, real_sample
    if stubbed:
        logits = torch.zeros(batch, engine.model.cfg.vocab_size)
        tokens = torch.full((batch,), 7, dtype=torch.long)

        def forward(inputs: Any, pool: Any) -> torch.Tensor:
            return logits[: inputs.rows.shape[0]]

        def sample(ops: Any, step_logits: torch.Tensor, inputs: Any) -> torch.Tensor:
            return tokens[: step_logits.shape[0]]

    scheduler.schedule = clocks["schedule"].wrap(scheduler.schedule)  # type: ignore[method-assign]
    runner.forward_decode = clocks["forward"].wrap(forward)  # type: ignore[method-assign]
    model_runner.sample_batch = clocks["sample"].wrap(sample)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - start
    finally:
        model_runner.sample_batch = real_sample
        del scheduler.schedule, runner.forward_decode
    while engine.has_unfinished():
        engine.step()
    ms = {name: c.seconds / steps * 1e3 for name, c in clocks.items()}
    step_ms = total / steps * 1e3
    rest = step_ms - sum(ms.values())
    host = ms["schedule"] + rest
    return {
        "bench": "engine_host_cpu",
        "batch": batch,
        "stubbed": stubbed,
        "step_ms": round(step_ms, 3),
        "schedule_ms": round(ms["schedule"], 3),
        "forward_ms": round(ms["forward"], 3),
        "sample_ms": round(ms["sample"], 3),
        "rest_ms": round(rest, 3),
        "host_ms": round(host, 3),
        "host_per_forward": None if stubbed else round(host / ms["forward"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-flash")
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", args.preset, quantized=True, seed=0)
        model = load_model(ckpt, dtype=torch.float32)
        batches = [int(b) for b in args.batches.split(",")]
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=4096))
        for batch in batches:
            for stubbed in (False, True):
                line = measure(engine, batch, args.steps, stubbed)
                print(json.dumps({"preset": args.preset, **line}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
