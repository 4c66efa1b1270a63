"""From a checkpoint folder to a ready model: official tensor names mapped onto the model's parameters."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dsv4.model_runtime.checkpoint import CheckpointError, CheckpointReader, load_tensor, read_config
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.schema import checkpoint_schema

_HC = re.compile(r"^(.*?)hc_(attn|ffn|head)_(fn|base|scale)$")
_EXPERT = re.compile(r"^(.*\.ffn)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def parameter_name(official: str) -> str:
    """Model parameter holding an official tensor (experts excepted: they are stacked, see `load_model`)."""
    m = _HC.match(official)
    if m:
        prefix, part, field = m.groups()
        return f"{prefix}hc_{part}.{field}"
    return official


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    qat_simulation: bool = True,
    mtp: bool = True,
) -> DeepseekV4:
    """Load an official-format checkpoint folder (config.json + safetensors) into a ready, eval-mode model.

    FP8/MXFP4 weights are dequantized to `dtype`. `qat_simulation=True` applies the official in-place rounding
    simulations (FP8 round trip of K=V and compressed entries, Hadamard + FP4 indexer q/k, bf16 indexer
    scoring); False gives the plain float semantics. `mtp=False` skips the `mtp.*` module (not needed for
    logits). Raises ConfigError / CheckpointError naming the problem.
    """
    cfg = read_config(path)
    device = torch.device(device)
    with torch.device(device):
        model = DeepseekV4(cfg, qat_simulation=qat_simulation, mtp=mtp)
    model.to(dtype)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    assigned: set[str] = set()
    with CheckpointReader(path) as reader, torch.no_grad():
        for spec in checkpoint_schema(cfg, include_mtp=mtp):
            value = load_tensor(reader, spec, dtype)
            expert = _EXPERT.match(spec.name)
            if expert:
                ffn, e, which = expert.group(1), int(expert.group(2)), expert.group(3)
                inter = cfg.moe_intermediate_size
                target = params[f"{ffn}.w2" if which == "w2" else f"{ffn}.w13"]
                rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter), "w2": slice(None)}[which]
                target[e, rows] = value.to(device)
                assigned.add(f"{ffn}.w2" if which == "w2" else f"{ffn}.w13")
                continue
            name = parameter_name(spec.name)
            if name not in params:
                raise CheckpointError(f"tensor {spec.name!r} in {reader.file_of(spec.name)} has no model parameter")
            params[name].copy_(value.to(device))
            assigned.add(name)
    missing = sorted(set(params) - assigned - {"rope_main.inv_freq", "rope_compress.inv_freq"})
    if missing:
        raise CheckpointError(f"{path}: model parameters not loaded from the checkpoint: {missing[:5]}")
    model.bind_ops()
    return model.eval()
