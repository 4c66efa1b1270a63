"""Decode steps replayed from device graphs, one per (batch bucket, block-table width), as vLLM and SGLang do.

A decode step (`DeepseekV4.decode_paged`) is a fixed sequence of kernels for a given batch size and block-table
width, with every input a device tensor, so it is captured once per shape and replayed: the rows of a step are
copied into the graph's static inputs, padded to the bucket with rows that feed token 0 at position 0 into the
pool's sink slot (their writes land in the sink slot and sink rows, which nothing reads), and the replay leaves
the head's input (the final norm's output, [bucket, d]) in the graph's static output. Batches are padded to 1, 2,
4, 8 and then multiples of 8; widths to powers of two. Graphs are captured on first use and share one memory pool.

The head runs eagerly after the replay, on the step's rows only: a graph's static output stays allocated for the
graph's life, one per (bucket, width), and fp32 logits are 2 * vocab / d = 63x the bf16 head input at Flash's
sizes (517 KB against 8 KB a row); the head is one matmul, whose launch a graph would not save, and padding rows
no longer pay for it. Sampling runs eagerly too (its work depends on the rows' parameters, not only on shapes). An
MTP verification step is captured the same way, as two graphs around its head and sampling: the model call over
[last token, draft], and the end (the MTP, the undo of rejected drafts, the next drafts), whose static input is
the step's draws.

On an Ascend NPU the same code captures with torch_npu's graph API (`torch.npu.NPUGraph`, `torch.npu.graph`,
`torch.npu.graph_pool_handle`: aclgraph, present in the pinned torch_npu 2.14.0 and shaped like torch.cuda's).
Without `capture` the same static buffers and padding are used and the step runs eagerly at "replay": the CPU
tests exercise everything here but the capture itself. NOT RUN ON A GPU OR AN NPU YET.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from dsv4.model_runtime.engine.kv_state import KVPool
from dsv4.model_runtime.engine.speculative import VerifyStep, verification_hidden
from dsv4.model_runtime.engine.step_inputs import DRAFT, DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4

GRAPH_DEVICES = ("cuda", "npu")


def graph_api(device: torch.device) -> tuple[ModuleType, Any]:
    """The device's graph namespace (torch.cuda or torch.npu) and its graph class."""
    if device.type == "cuda":
        return torch.cuda, torch.cuda.CUDAGraph
    if device.type == "npu":
        npu: Any = getattr(torch, "npu")  # noqa: B009  (torch_npu adds it; mypy's torch has none)
        return npu, npu.NPUGraph
    raise ValueError(f"device graphs run on {' or '.join(GRAPH_DEVICES)}, not on {device}")


def batch_bucket(rows: int) -> int:
    """The padded batch size of a step of `rows` rows: 1, 2, 4, 8, then the next multiple of 8."""
    if rows <= 8:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 8) * 8


def width_bucket(width: int, max_width: int) -> int:
    """The padded block-table width: the next power of two, at most the pool's table width."""
    return min(1 << max(0, width - 1).bit_length(), max_width)


@dataclass
class _Graph:
    rows: torch.Tensor  # [bucket, 3] static inputs ([bucket, 4] with the drafts of a verification step)
    block_tables: torch.Tensor  # [bucket, width]
    replay: Callable[[], torch.Tensor]  # runs the step, returns the static head input [bucket, d] ([bucket, 2, d])
    # A verification step's end: its static draws [bucket, 2] and the replay of its end, which returns the static
    # next drafts [bucket] (None in a decode step).
    tokens: torch.Tensor | None = None
    replay_end: Callable[[], torch.Tensor] | None = None


class DecodeGraphs:
    """The captured decode steps of one model over one pool, and its MTP verification steps (two graphs each: the
    model call, then, after the draws, the end: `speculative.end_verification`)."""

    def __init__(self, model: DeepseekV4, pool: KVPool, capture: bool) -> None:
        self.model, self.pool, self.capture = model, pool, capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._verify_graphs: dict[tuple[int, int], _Graph] = {}
        self._api = graph_api(model.device)[0] if capture else None
        self._mempool = self._api.graph_pool_handle() if self._api is not None else None
        # the row a padding row copies: token 0 at position 0 in the sink slot (draft 0 in a verification step)
        self._pad = torch.tensor([[0, 0, pool.sink_slot, 0]], dtype=torch.int64, device=model.device)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(batch bucket, table width) of every decode graph captured so far."""
        return sorted(self._graphs)

    @property
    def verify_shapes(self) -> list[tuple[int, int]]:
        """(batch bucket, table width) of every verification step captured so far."""
        return sorted(self._verify_graphs)

    def run(self, inputs: DecodeInputs, bucket: int | None = None) -> torch.Tensor:
        """Logits [D, vocab] of the step's D rows (inputs at their exact width, which must be a bucket width),
        padded to `bucket` rows (default: D's bucket; a data-parallel group pads to the bucket of the largest
        group's rows, so every rank replays the same shape, D = 0 included)."""
        graph, d = self._load(self._graphs, inputs, bucket)
        return self.model.head_logits(graph.replay()[:d])

    def run_verify(self, inputs: DecodeInputs, bucket: int | None = None) -> VerifyStep:
        """The verification step of `inputs` (rows with their drafts, at a bucket width), padded to `bucket` rows
        as in `run`: its model call replayed now, its end replayed by the returned step's `finish`."""
        graph, d = self._load(self._verify_graphs, inputs, bucket)
        logits = self.model.head_logits(graph.replay()[:d])
        tokens, replay_end = graph.tokens, graph.replay_end
        assert tokens is not None and replay_end is not None

        def finish(drawn: torch.Tensor) -> torch.Tensor:
            tokens[:d].copy_(drawn)
            tokens[d:].zero_()
            return replay_end()[:d]

        return VerifyStep(logits, graph.rows[:d, DRAFT], finish)

    def _load(
        self, graphs: dict[tuple[int, int], _Graph], inputs: DecodeInputs, bucket: int | None
    ) -> tuple[_Graph, int]:
        """The graph of the step's shape (captured now if new) with the step's rows and tables in its static
        inputs, padded; and the step's row count."""
        d, width = inputs.rows.shape[0], inputs.block_tables.shape[1]
        bucket = batch_bucket(d) if bucket is None else bucket
        if bucket < d or bucket != batch_bucket(bucket):
            raise ValueError(f"decode graphs: {d} rows do not pad to a bucket of {bucket}")
        key = (bucket, width)
        graph = graphs.get(key)
        if graph is None:
            graph = graphs[key] = self._build(bucket, width, inputs.verifies)
        graph.rows[:d].copy_(inputs.rows)
        graph.rows[d:].copy_(self._pad[:, : graph.rows.shape[1]].expand(graph.rows.shape[0] - d, -1))
        graph.block_tables[:d].copy_(inputs.block_tables)
        return graph, d

    def _build(self, bucket: int, width: int, verify: bool) -> _Graph:
        device = self.model.device
        rows = self._pad[:, : 4 if verify else 3].expand(bucket, -1).clone()
        block_tables = torch.zeros(bucket, width, dtype=torch.int32, device=device)
        tokens = torch.zeros(bucket, 2, dtype=torch.int64, device=device)
        # the end of the verification step whose model call was captured (the end graph runs it)
        started: list[Callable[[torch.Tensor], torch.Tensor]] = []

        def step() -> torch.Tensor:
            inputs = DecodeInputs(rows, block_tables)
            if not verify:
                return self.model.decode_paged_hidden(inputs.token_ids, inputs.step(self.pool))
            hidden, finish = verification_hidden(self.model, inputs, self.pool)
            started[:] = [finish]
            return hidden

        def end() -> torch.Tensor:
            return started[0](tokens)

        if self._api is None:
            return _Graph(rows, block_tables, step, tokens, end) if verify else _Graph(rows, block_tables, step)
        api = self._api
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its workspace, lazily built constants such
        # as the Hadamard matrix are made), then capture; the padding rows write only the sink slot and sink rows.
        side = api.Stream(device)
        side.wait_stream(api.current_stream(device))
        with api.stream(side):
            for _ in range(2):
                step()
                if verify:
                    end()
        api.current_stream(device).wait_stream(side)
        replay = self._captured(step)
        if not verify:
            return _Graph(rows, block_tables, replay)
        # The end's graph reads what the captured model call left in the memory pool (its streams and undo log),
        # which each replay of that call rewrites in place. Those live only from the call's replay to the end's, with
        # no other replay in between, so once both are captured their tensors are let go: later captures reuse the
        # memory, as they do the steps' intermediates, instead of every (bucket, width) keeping its own (the undo
        # log alone is ~40 KB a row in each CSA layer of Flash).
        replay_end = self._captured(end)
        started.clear()
        return _Graph(rows, block_tables, replay, tokens, replay_end)

    def _captured(self, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Capture `run` in a graph of the shared memory pool; the replay returns its static output."""
        api, graph_class = graph_api(self.model.device)
        graph = graph_class()
        with api.graph(graph, pool=self._mempool):
            out = run()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
