"""From a checkpoint folder to one rank's ready model, for any layout (one loader for world 1 and world N).

The model is built on the meta device; `parallel.shard` gives its modules this rank's shapes; then every tensor
this rank holds (`placement`) is read from the safetensors shards straight into a tensor allocated on the target
device: FP8 + scales and MXFP4 stay packed, F32 stays F32, BF16 takes the compute dtype (the target dtype of
the model; bf16 on accelerators). No fp32 copy of a packed weight, no other rank's piece. The MTP layer is
loaded too. Long loads log their progress (bytes, shards, rate).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsv4.model_runtime.checkpoint import CheckpointError, CheckpointReader, Entry, Stored, read_config
from dsv4.model_runtime.layers.linear import Linear
from dsv4.model_runtime.layers.rope import RopeTable
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.data_parallel import DataParallel
from dsv4.model_runtime.parallel.shard import shard_model
from dsv4.model_runtime.placement import Layout, Piece, expert_of, place
from dsv4.model_runtime.schema import checkpoint_schema
from dsv4.model_runtime.storage import FP4_BLOCK, FP8_BLOCK

log = logging.getLogger("dsv4.model_runtime.load")

_HC = re.compile(r"^(.*?)hc_(attn|ffn|head)_(fn|base|scale)$")
PROGRESS_EVERY_S = 5.0


@dataclass
class LoadReport:
    """What one rank read: the piece of every tensor it holds, the tensors it skipped, bytes, shards and time."""

    pieces: dict[str, Piece] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    bytes_read: int = 0
    shards: int = 0
    seconds: float = 0.0


class LoadProgress:
    """Logs a long load every PROGRESS_EVERY_S seconds: bytes and shards done of this rank's total, and the rate."""

    def __init__(self, what: str, total_bytes: int, total_shards: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.what, self.total_bytes, self.total_shards, self.every_s = what, total_bytes, total_shards, every_s
        self.bytes = self.shards = 0
        self.start = self._last = time.monotonic()

    def advance(self, n_bytes: int, shard_done: bool = False) -> None:
        self.bytes += n_bytes
        self.shards += int(shard_done)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log.info("%s: %s", self.what, self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        pct = 100.0 * self.bytes / max(self.total_bytes, 1)
        return (
            f"{self.bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB ({pct:.0f}%), shards {self.shards} of "
            f"{self.total_shards}, {self.bytes / elapsed / 1e9:.2f} GB/s, {elapsed:.1f} s"
        )


def parameter_name(official: str) -> str:
    """Model tensor holding an official tensor (routed experts excepted: they are stacked, see `load_rank`)."""
    m = _HC.match(official)
    if m:
        prefix, part, which = m.groups()
        return f"{prefix}hc_{part}.{which}"
    return official


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    qat_simulation: bool = True,
    mtp: bool = True,
) -> DeepseekV4:
    """The whole model of an official-format checkpoint folder on one device (world 1), ready and in eval mode.

    `dtype` is the compute dtype (activations and KV state); weights keep their checkpoint formats.
    `qat_simulation=True` applies the official in-place rounding simulations (FP8 round trip of K=V and
    compressed entries, Hadamard + FP4 indexer q/k, bf16 indexer scoring); False gives the plain float semantics.
    `mtp=False` skips the `mtp.*` module. Raises ConfigError / CheckpointError / PlacementError naming the problem.
    """
    return load_rank(path, Layout(), 0, device, dtype, qat_simulation, mtp)[0]


def load_rank(
    path: str | Path,
    layout: Layout,
    rank: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    qat_simulation: bool = True,
    mtp: bool = True,
    data_parallel: DataParallel | None = None,
) -> tuple[DeepseekV4, LoadReport]:
    """Rank `rank`'s shard of the model under `layout`, and what it read (world > 1 needs the process group for
    the forward pass, not for loading; a layout of several data-parallel groups needs their groups,
    `DataParallel.create`)."""
    start = time.monotonic()
    cfg = read_config(path)
    layout.check(cfg)
    device = torch.device(device)
    report = LoadReport()
    with CheckpointReader(path) as reader, torch.no_grad():
        stored_all = [reader.check(spec) for spec in checkpoint_schema(cfg, include_mtp=mtp)]  # headers only
        formats = {s.spec.name: s.format for s in stored_all}
        with torch.device("meta"):
            model = DeepseekV4(cfg, qat_simulation=qat_simulation, mtp=mtp, dtype=dtype)
            shard_model(model, layout, rank, formats.__getitem__, data_parallel)
        reads: list[tuple[Stored, Piece]] = []
        for stored in stored_all:
            spec = stored.spec
            model.weight_signature.append(f"{spec.name}:{list(spec.shape)}:{stored.format}")
            piece = place(spec, stored.format, cfg, layout, rank)
            if piece is None:
                report.skipped.append(spec.name)
            else:
                report.pieces[spec.name] = piece
                reads.append((stored, piece))
        reads.sort(key=lambda r: (str(r[0].weight.path), r[0].weight.offset))
        _read_all(model, reader, reads, layout, rank, device, report)
    with torch.device(device):  # non-persistent buffers are not in the checkpoint
        model.rope_main, model.rope_compress = RopeTable(cfg, compressed=False), RopeTable(cfg, compressed=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: model tensors not loaded from the checkpoint: {left[:5]}")
    model.bind_ops()
    report.seconds = time.monotonic() - start
    return model.eval(), report


def _read_all(
    model: DeepseekV4,
    reader: CheckpointReader,
    reads: list[tuple[Stored, Piece]],
    layout: Layout,
    rank: int,
    device: torch.device,
    report: LoadReport,
) -> None:
    files = [str(s.weight.path) for s, _ in reads]
    total = sum(_file_bytes(e, p) for s, p in reads for e, p in _entries(s, p))
    who = f"rank {rank} of {layout.world}" if layout.world > 1 else "model"
    progress = LoadProgress(f"loading {who} from {reader.folder}", total, len(set(files)))
    stacks: dict[tuple[str, str], torch.Tensor] = {}
    for i, (stored, piece) in enumerate(reads):
        for entry, epiece in _entries(stored, piece):
            dest = _destination(model, stored, piece, entry, epiece, layout, rank, device, stacks)
            n = reader.read_into(entry, dest, epiece.axis, epiece.start, epiece.stop)
            report.bytes_read += n
            progress.advance(n)
        if i + 1 == len(reads) or files[i + 1] != files[i]:
            report.shards += 1
            progress.advance(0, shard_done=True)
    log.info("%s: loaded %s", progress.what, progress.line())


def _entries(stored: Stored, piece: Piece) -> list[tuple[Entry, Piece]]:
    """The stored entries (weight, scale) of one tensor and the piece of each, in stored coordinates."""
    if piece.axis is None:
        return [(stored.weight, piece)] + ([(stored.scale, piece)] if stored.scale is not None else [])
    a, s, e = piece.axis, piece.start, piece.stop
    if stored.format == "fp8":
        assert stored.scale is not None
        blocks = Piece(a, s // FP8_BLOCK, -(-e // FP8_BLOCK))
        return [(stored.weight, piece), (stored.scale, blocks)]
    if stored.format == "fp4":
        assert stored.scale is not None
        if a == 0:
            return [(stored.weight, piece), (stored.scale, piece)]
        return [(stored.weight, Piece(1, s // 2, e // 2)), (stored.scale, Piece(1, s // FP4_BLOCK, e // FP4_BLOCK))]
    return [(stored.weight, piece)]


def _file_bytes(entry: Entry, piece: Piece) -> int:
    """Bytes a piece costs to read: its rows, or all rows for a column piece."""
    if piece.axis == 0:
        return entry.nbytes // entry.shape[0] * (piece.stop - piece.start)
    return entry.nbytes


def _local_shape(entry: Entry, piece: Piece) -> tuple[int, ...]:
    if piece.axis is None:
        return entry.shape
    return tuple(piece.stop - piece.start if i == piece.axis else n for i, n in enumerate(entry.shape))


def _destination(
    model: DeepseekV4,
    stored: Stored,
    logical: Piece,
    entry: Entry,
    piece: Piece,
    layout: Layout,
    rank: int,
    device: torch.device,
    stacks: dict[tuple[str, str], torch.Tensor],
) -> torch.Tensor:
    """The model tensor (or the view of a stacked expert tensor) that `piece` of `entry` goes into, allocated on
    `device` and installed in its module (`logical`: the same piece in the logical shape). Packed formats and F32
    tensors keep their stored dtype; BF16/F16 tensors take the compute dtype (exact: bf16 values are exact in
    fp32), so a CPU model computing in fp32 does not widen them at every call."""
    spec = stored.spec
    is_scale = entry is stored.scale
    held = model.dtype if not is_scale and stored.format in ("bf16", "f16") else entry.torch_dtype
    expert = expert_of(spec.name)
    if expert is not None:
        index, part = expert
        ffn = spec.name.split(".experts.")[0]
        module = model.get_submodule(ffn)
        attr = ("w2" if part == "w2" else "w13") + ("_scale" if is_scale else "")
        experts = layout.experts(model.cfg, rank)
        shape = _local_shape(entry, piece)
        key = (ffn, attr)
        if key not in stacks:
            rows = shape[0] * (1 if part == "w2" else 2)
            stack = torch.empty(len(experts), rows, *shape[1:], dtype=held, device=device)
            placeholder = getattr(module, "w2" if part == "w2" else "w13")
            if not is_scale and placeholder.is_meta:
                _check_logical(spec.name, placeholder.shape[1:], _expert_logical(stored, logical, part))
            _install(module, attr, stack, spec.name)
            stacks[key] = stack
        stack = stacks[key]
        if stack.dtype != held:
            raise CheckpointError(
                f"{entry.where}: stored {entry.dtype}, but expert {experts[0]} of this layer is held as "
                f"{stack.dtype}; one MoE layer's experts must share one format"
            )
        rows = shape[0]
        first = rows if part == "w3" else 0
        return stack[index - experts[0], first : first + rows]
    name = parameter_name(spec.name)
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        raise CheckpointError(f"{entry.where}: has no model parameter") from None
    if not hasattr(module, attr):
        raise CheckpointError(f"{entry.where}: has no model parameter")
    if is_scale:
        if not isinstance(module, Linear):
            raise CheckpointError(f"{entry.where}: stored {stored.format.upper()}, but the model keeps it as a float")
        attr = "scale"
    else:
        _check_logical(spec.name, tuple(getattr(module, attr).shape), logical.shape(spec.shape))
        if stored.format == "fp8" and spec.name.endswith("attn.wo_a.weight") and model.cfg.o_lora_rank % FP8_BLOCK:
            raise CheckpointError(
                f"{entry.where}: stored FP8, but 'o_lora_rank' ({model.cfg.o_lora_rank}), its rows per output "
                f"group, is not a multiple of {FP8_BLOCK}: a 128-row scale block would span two output groups"
            )
    dest = torch.empty(_local_shape(entry, piece), dtype=held, device=device)
    _install(module, attr, dest, spec.name)
    return dest


def _expert_logical(stored: Stored, piece: Piece, part: str) -> tuple[int, ...]:
    rows, cols = piece.shape(stored.spec.shape)
    return (rows * (1 if part == "w2" else 2), cols)


def _check_logical(name: str, have: tuple[int, ...] | torch.Size, want: tuple[int, ...]) -> None:
    if tuple(have) != tuple(want):
        raise CheckpointError(f"tensor {name!r}: this rank's piece is {list(want)}, the model expects {list(have)}")


def _install(module: nn.Module, attr: str, tensor: torch.Tensor, name: str) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"tensor {name!r}: the model has no {attr!r} for it")
