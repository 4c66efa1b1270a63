"""Checkpoint reading: safetensors shards in the official names, checked against the schema, read with positioned
reads straight into the caller's tensors (no memory map, no whole-tensor copy for a slice).

`CheckpointReader.check(spec)` says how the checkpoint stores one schema tensor (`Stored`: its format and the
entries of weight and `.scale`) from the shard headers alone; `read_into` copies the rows [start, stop) or
columns of one stored entry into a tensor of the caller (CPU memory directly; device tensors through a bounded
staging buffer). Every error names the tensor, the file and the rule: missing tensor, wrong shape or dtype, bad
or missing `.scale`, a blocked format that the tensor's shape does not fit, truncated or unreadable shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.schema import TensorSpec
from dsv4.model_runtime.storage import FP4_BLOCK, fp4_scale_shape, fp8_block_scale_shape

INDEX_FILE = "model.safetensors.index.json"
STAGING_BYTES = 64 << 20  # the most a read holds outside the destination tensor (column slices, device targets)
MAX_HEADER_BYTES = 100 << 20

DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
_PLAIN_FORMATS = {"BF16": "bf16", "F16": "f16", "F32": "f32"}


class CheckpointError(ValueError):
    """A checkpoint that does not match the official format; the message names the tensor and the file."""


@dataclass(frozen=True)
class Entry:
    """One tensor as a shard stores it: file, safetensors dtype, shape, absolute byte offset and length."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def where(self) -> str:
        return f"tensor {self.name!r} in {self.path}"


@dataclass(frozen=True)
class Stored:
    """How the checkpoint stores one schema tensor: its format (storage.Format) and entries."""

    spec: TensorSpec
    format: str
    weight: Entry
    scale: Entry | None = None


class ShardFile:
    """The header of one safetensors file; tensors are read with positioned reads of its data section."""

    def __init__(self, path: Path, first_tensor: str | None = None) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit the {size}-byte file")
                header = json.loads(f.read(n))
            data = 8 + n
            self.entries: dict[str, Entry] = {}
            end = data
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, stop = info["data_offsets"]
                self.entries[name] = Entry(name, path, info["dtype"], tuple(info["shape"]), data + begin, stop - begin)
                end = max(end, data + stop)
            if end > size:
                raise ValueError(f"data ends at byte {end}, the file has {size}")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            what = f"tensor {first_tensor!r} in " if first_tensor else ""
            raise CheckpointError(f"{what}{path}: cannot open safetensors shard, truncated or corrupt ({e})") from e
        self._fd: int | None = None

    def fd(self) -> int:
        """The file opened for positioned reads (once)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CheckpointReader:
    """The shards of one checkpoint folder: the weight map, every shard's header (opened lazily), and reads."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shards: dict[str, ShardFile] = {}
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
            weight_map.update(dict.fromkeys(self._shard(shard.name).entries, shard.name))
        return weight_map

    def _shard(self, fname: str, tensor: str | None = None) -> ShardFile:
        if fname not in self._shards:
            self._shards[fname] = ShardFile(self.folder / fname, tensor)
        return self._shards[fname]

    def file_of(self, name: str) -> str:
        return str(self.folder / self.weight_map.get(name, "?"))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def entry(self, name: str) -> Entry:
        """The stored entry `name`, from its shard's header."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.folder} (not in {INDEX_FILE})")
        shard = self._shard(self.weight_map[name], tensor=name)
        if name not in shard.entries:
            raise CheckpointError(f"tensor {name!r} in {shard.path}: listed in {INDEX_FILE} but not in the shard")
        return shard.entries[name]

    def check(self, spec: TensorSpec) -> Stored:
        """How the checkpoint stores `spec`, checked against the schema and the formats' rules (headers only)."""
        raw = self.entry(spec.name)
        where = raw.where
        if raw.dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown safetensors dtype {raw.dtype}")
        if spec.kind == "i64":
            if raw.dtype not in ("I64", "I32") or raw.shape != spec.shape:
                raise CheckpointError(
                    f"{where}: expected int64 {list(spec.shape)}, got {raw.torch_dtype} {list(raw.shape)}"
                )
            return Stored(spec, raw.dtype.lower(), raw)
        if raw.dtype == "F8_E4M3" and spec.kind == "fp8":
            _check_shape(where, raw.shape, spec.shape)
            return Stored(spec, "fp8", raw, self._scale(raw, fp8_block_scale_shape(*spec.shape)))
        if raw.dtype == "I8" and spec.kind == "fp4":
            out_f, in_f = spec.shape
            if in_f % FP4_BLOCK:
                raise CheckpointError(
                    f"{where}: stored as MXFP4 (I8, two e2m1 codes per byte, one scale per {FP4_BLOCK} columns), but "
                    f"its {in_f} input columns are not a multiple of {FP4_BLOCK}; MXFP4 needs whole blocks"
                )
            _check_shape(where, raw.shape, (out_f, in_f // 2))
            return Stored(spec, "fp4", raw, self._scale(raw, fp4_scale_shape(out_f, in_f)))
        if raw.dtype in _PLAIN_FORMATS and spec.kind != "i64":
            _check_shape(where, raw.shape, spec.shape)
            return Stored(spec, _PLAIN_FORMATS[raw.dtype], raw)
        expected = {"fp8": "F8_E4M3 or BF16", "fp4": "I8 (MXFP4) or BF16", "bf16": "BF16", "f32": "F32"}[spec.kind]
        raise CheckpointError(f"{where}: dtype {raw.torch_dtype} is not valid here (expected {expected})")

    def _scale(self, weight: Entry, shape: tuple[int, int]) -> Entry:
        name = weight.name.removesuffix(".weight") + ".scale"
        if not self.has(name):
            raise CheckpointError(
                f"scale tensor {name!r} is missing from checkpoint {self.folder} "
                f"(the quantized weight {weight.name!r} in {weight.path} needs it)"
            )
        s = self.entry(name)
        where = f"scale tensor {name!r} in {s.path}"
        if s.dtype not in ("F8_E8M0", "F32"):
            raise CheckpointError(
                f"{where}: dtype {DTYPES.get(s.dtype, s.dtype)} is not a valid scale dtype (expected F8_E8M0 or F32)"
            )
        if s.shape != shape:
            raise CheckpointError(f"{where}: bad scale shape {list(s.shape)} (expected {list(shape)})")
        return s

    def read_into(
        self, entry: Entry, dest: torch.Tensor, axis: int | None = None, start: int = 0, stop: int = 0
    ) -> int:
        """Copy `entry` (or its [start, stop) along `axis`: 0 = rows, 1 = columns) into `dest`, which has exactly
        that shape and the entry's dtype (or, for a BF16/F16/F32 entry, any float dtype it is converted to through
        the staging buffer); returns the bytes read from the file."""
        shape = entry.shape
        if axis is None:
            axis, start, stop = 0, 0, shape[0]
        want = (stop - start, *shape[1:]) if axis == 0 else (shape[0], stop - start, *shape[2:])
        widened = entry.dtype in _PLAIN_FORMATS and dest.is_floating_point()  # BF16 into the compute dtype
        if tuple(dest.shape) != want or (dest.dtype != entry.torch_dtype and not widened):
            raise CheckpointError(
                f"{entry.where}: the model's tensor {list(dest.shape)} {dest.dtype} cannot take "
                f"{list(want)} {entry.torch_dtype} of it"
            )
        fd = self._shard(entry.path.name, entry.name).fd()
        row_bytes = entry.nbytes // shape[0] if shape[0] else 0
        if axis == 0:
            first, n_rows = entry.offset + start * row_bytes, stop - start
            if dest.device.type == "cpu" and dest.is_contiguous() and dest.dtype == entry.torch_dtype:  # in place
                _pread(fd, entry, dest.reshape(-1).view(torch.uint8), first)
            else:
                for r, n in _chunks(n_rows, row_bytes):
                    staging = torch.empty(n * row_bytes, dtype=torch.uint8)
                    _pread(fd, entry, staging, first + r * row_bytes)
                    dest[r : r + n].copy_(staging.view(entry.torch_dtype).view(n, *shape[1:]))
            return n_rows * row_bytes
        for r, n in _chunks(shape[0], row_bytes):  # whole rows through the staging buffer, then the columns
            staging = torch.empty(n * row_bytes, dtype=torch.uint8)
            _pread(fd, entry, staging, entry.offset + r * row_bytes)
            dest[r : r + n].copy_(staging.view(entry.torch_dtype).view(n, *shape[1:])[:, start:stop])
        return shape[0] * row_bytes

    def get(self, name: str) -> torch.Tensor:
        """The whole stored tensor `name`, as a new CPU tensor."""
        entry = self.entry(name)
        out = torch.empty(entry.shape, dtype=entry.torch_dtype)
        self.read_into(entry, out)
        return out

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """(first row, rows) pieces of at most STAGING_BYTES (at least one row each)."""
    step = max(1, STAGING_BYTES // max(row_bytes, 1))
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def _pread(fd: int, entry: Entry, buf: torch.Tensor, offset: int) -> None:
    """Fill the uint8 CPU tensor `buf` from `offset`; a short read is a truncated shard."""
    view = buf.numpy().data.cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{entry.where}: cannot read, the shard ends early (truncated)")
        done += n


def _check_shape(where: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{where}: shape {list(shape)} does not match the config (expected {list(expected)})")


def read_config(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder."""
    return ModelConfig.from_file(Path(folder) / "config.json")
