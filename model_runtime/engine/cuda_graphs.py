"""Decode steps replayed from device graphs, one per (batch bucket, block-table width), as vLLM and SGLang do.

A decode step (`DeepseekV4.decode_paged`) is a fixed sequence of kernels for a given batch size and block-table
width, with every input a device tensor, so it is captured once per shape and replayed: the rows of a step are
copied into the graph's static inputs, padded to the bucket with rows that feed token 0 at position 0 into the
pool's sink slot (their writes land in the sink slot and sink rows, which nothing reads), and the replay leaves
the logits in the graph's static output. Batches are padded to 1, 2, 4, 8 and then multiples of 8; widths to
powers of two. Graphs are captured on first use and share one memory pool. Sampling runs eagerly after the
replay (its work depends on the rows' parameters, not only on shapes).

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
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
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
    rows: torch.Tensor  # [bucket, 3] static inputs
    block_tables: torch.Tensor  # [bucket, width]
    replay: Callable[[], torch.Tensor]  # runs the step, returns the static logits [bucket, vocab]


class DecodeGraphs:
    """The captured decode steps of one model over one pool."""

    def __init__(self, model: DeepseekV4, pool: KVPool, capture: bool) -> None:
        self.model, self.pool, self.capture = model, pool, capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._api = graph_api(model.device)[0] if capture else None
        self._mempool = self._api.graph_pool_handle() if self._api is not None else None
        # the row a padding row copies: token 0 at position 0 in the sink slot
        self._pad = torch.tensor([[0, 0, pool.sink_slot]], dtype=torch.int64, device=model.device)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(batch bucket, table width) of every graph captured so far."""
        return sorted(self._graphs)

    def run(self, inputs: DecodeInputs, bucket: int | None = None) -> torch.Tensor:
        """Logits [D, vocab] of the step's D rows (inputs at their exact width, which must be a bucket width),
        padded to `bucket` rows (default: D's bucket; a data-parallel group pads to the bucket of the largest
        group's rows, so every rank replays the same shape, D = 0 included)."""
        d, width = inputs.rows.shape[0], inputs.block_tables.shape[1]
        bucket = batch_bucket(d) if bucket is None else bucket
        if bucket < d or bucket != batch_bucket(bucket):
            raise ValueError(f"decode graphs: {d} rows do not pad to a bucket of {bucket}")
        key = (bucket, width)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(bucket, width)
        graph.rows[:d].copy_(inputs.rows)
        graph.rows[d:].copy_(self._pad.expand(graph.rows.shape[0] - d, -1))
        graph.block_tables[:d].copy_(inputs.block_tables)
        return graph.replay()[:d]

    def _build(self, bucket: int, width: int) -> _Graph:
        device = self.model.device
        rows = self._pad.expand(bucket, -1).clone()
        block_tables = torch.zeros(bucket, width, dtype=torch.int32, device=device)

        def step() -> torch.Tensor:
            inputs = DecodeInputs(rows, block_tables)
            return self.model.decode_paged(inputs.token_ids, inputs.step(self.pool))

        if self._api is None:
            return _Graph(rows, block_tables, step)
        api, graph_class = graph_api(device)
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its workspace, lazily built constants such
        # as the Hadamard matrix are made), then capture; the padding rows write only the sink slot and sink rows.
        side = api.Stream(device)
        side.wait_stream(api.current_stream(device))
        with api.stream(side):
            for _ in range(2):
                step()
        api.current_stream(device).wait_stream(side)
        graph = graph_class()
        with api.graph(graph, pool=self._mempool):
            logits = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return _Graph(rows, block_tables, replay)
