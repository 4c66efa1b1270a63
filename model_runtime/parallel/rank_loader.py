"""Load this rank's shard of an official-format checkpoint: owned experts only, and for tensor-parallel
attention only this rank's rows/columns of wq_b, attn_sink, wo_a and wo_b (read as safetensors slices; FP8
block scales are sliced with them). The model is built on the meta device and materialized at shard size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4.model_runtime.checkpoint import CheckpointError, CheckpointReader, load_tensor, read_config
from dsv4.model_runtime.formats import FP8_BLOCK, dequant_fp8
from dsv4.model_runtime.layers.rope import RopeTable
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.group import ParallelConfig
from dsv4.model_runtime.parallel.shard import shard_model
from dsv4.model_runtime.schema import TensorSpec, checkpoint_schema
from dsv4.model_runtime.weights import parameter_name

_EXPERT = re.compile(r"^(.*\.ffn)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
# attention tensors split by tensor parallelism: name suffix -> the axis split (rows 0, columns 1)
_TP_SPLIT = {"attn.wq_b.weight": 0, "attn.attn_sink": 0, "attn.wo_a.weight": 0, "attn.wo_b.weight": 1}


@dataclass
class ReadLog:
    """What this rank read: full tensors, and sliced ones with the slice taken."""

    full: list[str] = field(default_factory=list)
    sliced: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (axis, start, stop)
    skipped: list[str] = field(default_factory=list)


def _read_slice(
    reader: CheckpointReader, spec: TensorSpec, axis: int, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows (axis 0) or columns (axis 1) [start, stop) of one tensor, dequantized, read as a slice."""
    fname = reader.weight_map.get(spec.name)
    if fname is None:
        raise CheckpointError(f"tensor {spec.name!r} is missing from checkpoint {reader.folder}")
    path = str(reader.folder / fname)
    with safe_open(path, framework="pt") as f:
        index = (slice(start, stop),) if axis == 0 else (slice(None), slice(start, stop))
        part = f.get_slice(spec.name)[index]
        if part.dtype != torch.float8_e4m3fn:
            return part.to(dtype)
        if start % FP8_BLOCK or (stop % FP8_BLOCK and stop != spec.shape[axis]):
            raise CheckpointError(f"{spec.name} in {path}: shard [{start}, {stop}) is not 128-block aligned")
        scale_name = spec.name.removesuffix(".weight") + ".scale"
        with safe_open(str(reader.folder / reader.weight_map[scale_name]), framework="pt") as fs:
            blocks = slice(start // FP8_BLOCK, -(-stop // FP8_BLOCK))
            scale = fs.get_slice(scale_name)[(blocks,) if axis == 0 else (slice(None), blocks)]
        return dequant_fp8(part, scale, dtype)


def load_parallel_model(
    path: str | Path,
    pc: ParallelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    qat_simulation: bool = True,
) -> tuple[DeepseekV4, ReadLog]:
    """This rank's model (tp/ep shards of `pc`) and a log of the tensors it read; MTP layers are not loaded."""
    cfg = read_config(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = DeepseekV4(cfg, qat_simulation=qat_simulation, mtp=False)
    shard_model(model, pc)
    model.to_empty(device=device)
    model.to(dtype)
    with torch.device(device):  # non-persistent buffers are not in the checkpoint: rebuild them
        model.rope_main, model.rope_compress = RopeTable(cfg, compressed=False), RopeTable(cfg, compressed=True)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    log, assigned = ReadLog(), set()
    first_expert, stop_expert = pc.span(cfg.n_routed_experts, pc.ep, "routed experts")
    with CheckpointReader(path) as reader, torch.no_grad():
        for spec in checkpoint_schema(cfg, include_mtp=False):
            expert = _EXPERT.match(spec.name)
            if expert:
                ffn, e, which = expert.group(1), int(expert.group(2)), expert.group(3)
                if not first_expert <= e < stop_expert:
                    log.skipped.append(spec.name)
                    continue
                inter = cfg.moe_intermediate_size
                target = f"{ffn}.w2" if which == "w2" else f"{ffn}.w13"
                rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter), "w2": slice(None)}[which]
                params[target][e - first_expert, rows] = load_tensor(reader, spec, dtype).to(device)
                log.full.append(spec.name)
                assigned.add(target)
                continue
            name = parameter_name(spec.name)
            if ".ffn.shared_experts." in name and pc.ep > 1 and pc.rank != 0:  # rank 0 alone runs it
                log.skipped.append(spec.name)
                continue
            if name not in params:
                raise CheckpointError(f"tensor {spec.name!r} in {reader.file_of(spec.name)} has no model parameter")
            axis = next((a for suffix, a in _TP_SPLIT.items() if spec.name.endswith(suffix)), None)
            if axis is not None and pc.tp > 1:
                size = params[name].shape[axis]
                start = pc.rank * size
                value = _read_slice(reader, spec, axis, start, start + size, dtype)
                log.sliced[spec.name] = (axis, start, start + size)
            else:
                value = load_tensor(reader, spec, dtype)
                log.full.append(spec.name)
            params[name].copy_(value.to(device))
            assigned.add(name)
    missing = sorted(set(params) - assigned - {"rope_main.inv_freq", "rope_compress.inv_freq"})
    if missing:
        raise CheckpointError(f"{path}: model parameters not loaded from the checkpoint: {missing[:5]}")
    model.bind_ops()
    return model.eval(), log
