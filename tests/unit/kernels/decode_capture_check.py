"""The batched decode step as a CUDA graph would capture it, on a fake CUDA device (a subprocess of
test_decode_capture.py; JSON on stdout).

`FakeTensorMode` gives tensors a CUDA device and shapes without memory or a GPU: an op whose output depends on
values (`.item()`, `nonzero`, ...) raises, and a CPU tensor meeting a CUDA one is a device error, which is what a
capture refuses or silently bakes in. The tiny-flash model (bf16, QAT on, FP8/MXFP4 weights) runs two decode
steps of `rows` rows, then an MTP verification step, through `DecodeGraphs`' padded static buffers (capture off),
with the `reference` backend or the `cuda` one, whose Triton launches are recorded instead of run (their wrappers'
host code runs: tile schedules, views, allocations). The first step warms up (device tables cached per device are
made then, as `DecodeGraphs` warms up before it captures); in the second every dispatched op is recorded, and any
that takes a CPU tensor of one or more dimensions or makes a CPU tensor is reported with its call site.

With a layout ("world,tp,ep") the model is rank 0's shard of it, over a fake process group (the collectives of
the sharded layers return at once): the tensor-parallel layers, the expert-parallel MoE and, with tp < world,
data-parallel attention, whose step is padded to the same bucket in every group (`parallel/engine_group.py`).

A subprocess, because the caches of device tables would otherwise keep fake tensors for this process's later
tests, and a process group is made once. usage: decode_capture_check.py BACKEND ROWS [WORLD,TP,EP]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # the launches are recorded, never compiled or run

import torch
import torch.distributed as dist
import triton.runtime.interpreter as interpreter
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4.kernels.cuda.launch as launch
from dsv4.model_runtime.engine import kv_state, penalty_table, sampler
from dsv4.model_runtime.engine.cuda_graphs import DecodeGraphs, batch_bucket, width_bucket
from dsv4.model_runtime.engine.penalty_table import PenaltyTable
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampler import SampleRequest, SamplingInputs, sample_batch, sampled_tokens
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.data_parallel import DataParallel
from dsv4.model_runtime.placement import Layout
from dsv4.model_runtime.weights import load_model, load_rank

REPO = str(Path(__file__).resolve().parents[3])


def _site() -> str:
    frames = [
        f
        for f in traceback.extract_stack()
        if f.filename.startswith(REPO) and "/tests/" not in f.filename and "site-packages" not in f.filename
    ]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.relpath(f.filename, REPO)}:{f.lineno} {f.line}"


class HostTensors(TorchDispatchMode):
    """Records the ops that take a CPU tensor of one or more dimensions or make a CPU tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in ins) or any(t.device.type == "cpu" for t in outs):
            self.hits.append((str(func), _site()))
        return out


def _model(ckpt: Path, layout_arg: str | None) -> tuple[DeepseekV4, DataParallel | None]:
    """The whole model, or rank 0's shard of the layout "world,tp,ep" over a fake process group (bf16, on CPU)."""
    if layout_arg is None:
        return load_model(ckpt, dtype=torch.bfloat16), None
    world, tp, ep = (int(v) for v in layout_arg.split(","))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    layout = Layout(world=world, tp=tp, ep=ep)
    dp = DataParallel.create(layout, 0) if layout.dp > 1 else None
    return load_rank(ckpt, layout, 0, "cpu", torch.bfloat16, data_parallel=dp)[0], dp


def main(backend: str, rows: int, layout_arg: str | None = None) -> dict[str, Any]:
    launched: list[str] = []

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launched.append(self.fn.__name__)

    interpreter.InterpretedFunction.run = record  # type: ignore[method-assign]
    launch.INTERPRETED = False  # the cuda wrappers accept the fake CUDA tensors
    # pinned memory has no fake implementation: the engine's host-to-device copies (outside the step) go plainly
    for module in (kv_state, sampler, penalty_table):
        module.to_device = lambda host, device: host.to(device)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        model, dp = _model(write_checkpoint(Path(tmp) / "ckpt", "tiny-flash", quantized=True, seed=0), layout_arg)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        model.bind_ops(backend)
        kv = kv_state.KVCacheManager(model, num_blocks=32, block_size=8, num_slots=rows + 1)
        seqs = []
        for i in range(rows):
            n = 5 + 7 * i  # contexts across pool blocks and compressor blocks
            seq = Request(f"r{i}", list(range(3, 3 + n)), SamplingParams(), seed=0, eos_token_id=None)
            kv.grow(seq, n + 4)  # two decode steps, then a verification step
            assert isinstance(seq.state, kv_state.PagedSequenceState)
            seq.state.position = n
            seqs.append(seq)
        kv.pool.flush_block_tables()
        graphs = DecodeGraphs(model, kv.pool, capture=False)
        traced = HostTensors()
        for step in range(2):
            table = [[7, s.state.position, s.state.slot] for s in seqs]  # type: ignore[union-attr]
            inputs = torch.tensor(table).to("cuda")
            width = width_bucket(max(s.state.position for s in seqs) // 8 + 1, kv.pool.max_blocks)  # type: ignore[union-attr]
            step_inputs = DecodeInputs(inputs, kv.pool.block_tables[inputs[:, 2], :width])
            launched.clear()
            if dp is not None:  # as `run_call` sets it: every group pads to the same bucket
                dp.set_rows([batch_bucket(rows)] * dp.layout.dp)
            if step == 1:
                with traced:
                    logits = graphs.run(step_inputs)
            else:
                logits = graphs.run(step_inputs)
            for s in seqs:
                s.state.position += 1  # type: ignore[union-attr]
        step_kernels, step_launches = sorted(set(launched)), len(launched)
        verified = _verify(graphs, seqs, kv.pool, launched, dp)
        sampled = _sample(model, logits, seqs, launched)
        return {
            "backend": backend,
            "rows": rows,
            "layout": layout_arg,
            "logits": [list(logits.shape), str(logits.device), str(logits.dtype)],
            "host_tensors": sorted(set(traced.hits)),
            "kernels": step_kernels,
            "launches": step_launches,
            **verified,
            **sampled,
        }


def _verify(
    graphs: DecodeGraphs, seqs: list[Request], pool: kv_state.KVPool, launched: list[str], dp: DataParallel | None
) -> dict[str, Any]:
    """An MTP verification step (last token and draft per row) through `DecodeGraphs.run_verify`: its model call,
    then its end (the MTP, the undo of rejected drafts), a warm-up first and then traced as the decode step. Under
    data-parallel attention both parts exchange 2 tokens per padded row between the groups, as
    `engine_group.start_verify` sets them."""
    traced = HostTensors()
    if dp is not None:
        dp.set_rows([2 * batch_bucket(len(seqs))] * dp.layout.dp)
    for step in range(2):
        table = [[7, s.state.position, s.state.slot, 9] for s in seqs]  # type: ignore[union-attr]
        rows = torch.tensor(table).to("cuda")
        width = width_bucket(max(s.state.position + 1 for s in seqs) // 8 + 1, pool.max_blocks)  # type: ignore[union-attr]
        inputs = DecodeInputs(rows, pool.block_tables[rows[:, 2], :width])
        draws = torch.tensor([[9, 4]] * len(seqs)).to("cuda")
        launched.clear()
        if step == 1:
            with traced:
                verify = graphs.run_verify(inputs)
                drafts = verify.finish(draws)
        else:
            graphs.run_verify(inputs).finish(draws)
    return {
        "verify_logits": [list(verify.logits.shape), str(verify.logits.device)],
        "drafts": [list(drafts.shape), str(drafts.device)],
        "verify_host_tensors": sorted(set(traced.hits)),
        "verify_kernels": sorted(set(launched)),
        "verify_launches": len(launched),
    }


def _sample(model: DeepseekV4, logits: torch.Tensor, seqs: list[Request], launched: list[str]) -> dict[str, Any]:
    """The step's sampling call (eager after the replay, as the engine makes it) with every stage: logit biases,
    temperature, top-k, top-p, min-p, seeded draws, penalties from the device table, logprobs; its ops recorded as
    the step's."""
    params = SamplingParams(
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        repetition_penalty=1.2,
        frequency_penalty=0.2,
        logprobs=3,
        logit_bias=((7, 2.0),),
    )
    for s in seqs:
        s.params = params
    table = PenaltyTable(model.cfg.vocab_size, model.device)
    rows = table.rows(seqs)
    requests = [SampleRequest(s.params, 5, 0, s.prompt_token_ids, s.output_token_ids) for s in seqs]
    inputs = SamplingInputs.build(requests, logits.shape[-1], model.device, table.penalties(rows, seqs))
    traced = HostTensors()
    launched.clear()
    with traced:
        out = sample_batch(model.ops, logits, inputs)
        table.record(rows, sampled_tokens(out), seqs)
    return {
        "sampled": [list(out.shape), str(out.device)],
        "sample_host_tensors": sorted(set(traced.hits)),
        "sample_kernels": sorted(set(launched)),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)))
