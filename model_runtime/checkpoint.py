"""Checkpoint loading: memory-mapped safetensors shards in the official names, FP8/FP4 dequantized on load.

Every error names the tensor and the file: missing tensor, wrong shape, wrong dtype, bad `.scale` shape,
truncated or unreadable shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.formats import dequant_fp4, dequant_fp8, fp4_scale_shape, fp8_block_scale_shape
from dsv4.model_runtime.schema import TensorSpec

INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CheckpointError(ValueError):
    """A checkpoint that does not match the official format; the message names the tensor and the file."""


class CheckpointReader:
    """Opens the shards of one checkpoint folder lazily (memory-mapped) and reads tensors by official name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.folder}: no {INDEX_FILE} and no *.safetensors files")
        weight_map: dict[str, str] = {}
        for shard in shards:
            names = self._open(shard.name).keys()
            weight_map.update(dict.fromkeys(names, shard.name))
        return weight_map

    def _open(self, fname: str, tensor: str | None = None) -> Any:
        if fname not in self._handles:
            path = self.folder / fname
            try:
                self._handles[fname] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
                what = f"tensor {tensor!r} in " if tensor else ""
                raise CheckpointError(f"{what}{path}: cannot open safetensors shard, truncated or corrupt ({e})") from e
        return self._handles[fname]

    def file_of(self, name: str) -> str:
        return str(self.folder / self.weight_map.get(name, "?"))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (memory-mapped where possible)."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.folder} (not in {INDEX_FILE})")
        fname = self.weight_map[name]
        handle = self._open(fname, tensor=name)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {self.folder / fname}: cannot read ({e})") from e

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_tensor(reader: CheckpointReader, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor of the schema and return it in its logical shape (dequantized floats, or int64)."""
    raw = reader.get(spec.name)
    where = f"tensor {spec.name!r} in {reader.file_of(spec.name)}"
    scale_name = spec.name.removesuffix(".weight") + ".scale"
    if spec.kind == "i64":
        if raw.dtype not in (torch.int64, torch.int32) or tuple(raw.shape) != spec.shape:
            raise CheckpointError(f"{where}: expected int64 {list(spec.shape)}, got {raw.dtype} {list(raw.shape)}")
        return raw.long()
    if raw.dtype == torch.float8_e4m3fn and spec.kind == "fp8":
        _check_shape(where, raw, spec.shape)
        scale = _scale(reader, scale_name, fp8_block_scale_shape(*spec.shape))
        return dequant_fp8(raw, scale, dtype)
    if raw.dtype == torch.int8 and spec.kind == "fp4":
        _check_shape(where, raw, (spec.shape[0], spec.shape[1] // 2))
        scale = _scale(reader, scale_name, fp4_scale_shape(*spec.shape))
        return dequant_fp4(raw, scale, dtype)
    if raw.dtype in _FLOAT_DTYPES:
        _check_shape(where, raw, spec.shape)
        return raw.to(dtype)
    expected = {"fp8": "F8_E4M3 or BF16", "fp4": "I8 (MXFP4) or BF16", "bf16": "BF16", "f32": "F32"}[spec.kind]
    raise CheckpointError(f"{where}: dtype {raw.dtype} is not valid here (expected {expected})")


def _check_shape(where: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where}: shape {list(t.shape)} does not match the config (expected {list(shape)})")


def _scale(reader: CheckpointReader, name: str, shape: tuple[int, int]) -> torch.Tensor:
    if not reader.has(name):
        weight = name.removesuffix(".scale") + ".weight"
        raise CheckpointError(
            f"scale tensor {name!r} is missing from checkpoint {reader.folder} "
            f"(the quantized weight {weight!r} in {reader.file_of(weight)} needs it)"
        )
    where = f"scale tensor {name!r} in {reader.file_of(name)}"
    s = reader.get(name)
    if s.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise CheckpointError(f"{where}: dtype {s.dtype} is not a valid scale dtype (expected F8_E8M0 or F32)")
    if tuple(s.shape) != tuple(shape):
        raise CheckpointError(f"{where}: bad scale shape {list(s.shape)} (expected {list(shape)})")
    return s


def load_state(
    folder: str | Path, specs: Iterable[TensorSpec], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """Yield (spec, tensor) for every spec, dequantized to `dtype`; raises CheckpointError on the first problem."""
    with CheckpointReader(folder) as reader:
        for spec in specs:
            yield spec, load_tensor(reader, spec, dtype)


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder."""
    return ModelConfig.from_file(Path(folder) / "config.json")
