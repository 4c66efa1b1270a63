"""The portable KV state of one sequence: a versioned, self-describing, checksummed byte format.

Layout (little endian):

    magic b"DSV4-KV\\n" | u32 format version | u32 header length | u32 crc32c(header) | header (UTF-8 JSON) | body

The header names the model (`model_fingerprint`: sha256 of the config, every checkpoint tensor's name, logical
shape and stored format, the compute dtype and the QAT flag), the position the state stands at, and every section
of the body in order (name, dtype, shape, byte count). The body is cut in `chunk_size` chunks, each with its crc32c
in the header, so a reader can verify the stream chunk by chunk. Per layer the parts are: the window ring; for
compressed layers the entries (position // m of them) and the compressor's live rows; for CSA layers also the
indexer keys and the indexer compressor's live rows. A state whose MTP module has followed it to its position
carries the MTP layers' state too (`mtp.{j}.*` sections after the decoder layers', `mtp_layers` in the header) and
the MTP's draft for the token after the next one (`mtp_draft`, or null), so the importing engine verifies a draft in
its first decode step; a blob without them imports as a state without an MTP cache.
K=V rows and indexer keys are stored in the paged pool's
formats (`kv_layout`: FP8 e4m3 + UE8M0 scales and MXFP4 when the model runs the QAT simulation, exact for the
values it rounds), one section per stored field (`layers.3.entries.fp8`, `.scale`, `.rope`); compressor rows in
fp32. `load` checks all of it against the importing model and raises `KVFormatError` (a `KVImportError`, hence a
ValueError) naming
what is wrong; it never returns a state it did not fully verify.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import crc32c
import torch

from dsv4.model_runtime.engine.fingerprint import model_fingerprint
from dsv4.model_runtime.engine.kv_layout import RowCodec, entry_codec, index_key_codec
from dsv4.model_runtime.engine.port import KVImportError
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import LayerState, SequenceState

FORMAT_VERSION = 1
MAGIC = b"DSV4-KV\n"
PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header crc32c
CHUNK_SIZE = 1 << 20
MAX_HEADER_BYTES = 16 << 20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVFormatError(KVImportError):
    """A KV blob that this engine refuses: truncated, corrupted, another format version or another model."""


@dataclass(frozen=True)
class SectionSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


@dataclass(frozen=True)
class KVSnapshot:
    """A verified, parsed KV state: tensors by section name, at `position`; `restore` puts it into a state.
    `mtp_layers`: how many MTP layers' state it carries (0: none, the state has no MTP cache)."""

    position: int
    tensors: dict[str, torch.Tensor]
    mtp_layers: int = 0
    mtp_draft: int | None = None  # the MTP's guess for the token after the one that follows the state


def _comp_rows(ratio: int, csa: bool, position: int) -> int:
    """Live rows of a compressor state: CSA keeps the previous block and the current one's r tokens."""
    r = position % ratio
    return ratio + r if csa else r


def _parts(model: DeepseekV4, layer: int, position: int) -> list[tuple[str, RowCodec, int]]:
    """(part, row format, rows) of one layer's state at `position`: K=V rows and indexer keys in the pool's
    formats (`kv_layout`: FP8 / MXFP4 when the model rounds to them), compressor rows in fp32."""
    cfg, dt, f32, low = model.cfg, model.dtype, torch.float32, model.qat_simulation
    parts = [("window", entry_codec(cfg, dt, low), cfg.sliding_window)]
    m = cfg.ratio(layer)
    if m:
        csa = cfg.is_csa(layer)
        width, rows = (2 if csa else 1) * cfg.head_dim, _comp_rows(m, csa, position)
        parts += [
            ("entries", entry_codec(cfg, dt, low), position // m),
            ("comp_kv", RowCodec(width, f32), rows),
            ("comp_score", RowCodec(width, f32), rows),
        ]
        if csa:
            parts += [
                ("index_keys", index_key_codec(cfg, dt, low), position // m),
                ("icomp_kv", RowCodec(2 * cfg.index_head_dim, f32), rows),
                ("icomp_score", RowCodec(2 * cfg.index_head_dim, f32), rows),
            ]
    return parts


def _layers(model: DeepseekV4, mtp_layers: int) -> list[tuple[str, int]]:
    """(section prefix, model layer) of every layer a state carries: the decoder layers, then `mtp_layers` MTP
    layers (MTP layer j is model layer num_hidden_layers + j)."""
    n = model.cfg.num_hidden_layers
    return [(f"layers.{i}", i) for i in range(n)] + [(f"mtp.{j}", n + j) for j in range(mtp_layers)]


def section_specs(model: DeepseekV4, position: int, mtp_layers: int = 0) -> list[SectionSpec]:
    """The sections, in order, of a state at `position` for `model` (with the state of `mtp_layers` MTP layers):
    one per stored field of every part."""
    return [
        SectionSpec(f"{prefix}.{part}.{f.name}", f.dtype, (rows, f.width))
        for prefix, layer in _layers(model, mtp_layers)
        for part, codec, rows in _parts(model, layer, position)
        for f in codec.fields
    ]


def _layer_states(model: DeepseekV4, state: SequenceState, mtp_layers: int) -> list[tuple[str, int, LayerState]]:
    """(section prefix, model layer, the state's layer) of the decoder layers and the first `mtp_layers` MTP
    layers of `state`."""
    held = [*state.layers, *state.mtp_layers[:mtp_layers]]
    return [(prefix, layer, ls) for (prefix, layer), ls in zip(_layers(model, mtp_layers), held, strict=True)]


def carried_mtp_layers(state: SequenceState) -> int:
    """The MTP layers whose state an export of `state` carries: all of them when its MTP module has consumed every
    position the main model has, else none (the MTP runs one step behind while a draft's token is unknown)."""
    return len(state.mtp_layers) if state.mtp_layers and state.mtp_position == state.position else 0


def _part_tensor(ls: LayerState, part: str, rows: int) -> torch.Tensor:
    if part == "window":
        return ls.window
    if part == "entries":
        return ls.valid_entries()
    if part == "index_keys":
        return ls.valid_index_keys()
    return getattr(ls, part)[:rows]


def export_state(
    model: DeepseekV4, state: SequenceState, chunk_size: int = CHUNK_SIZE, draft: int | None = None
) -> bytes:
    """The blob of `state` (see the module doc)."""
    return b"".join(export_chunks(model, state, chunk_size, draft))


def export_chunks(
    model: DeepseekV4, state: SequenceState, chunk_size: int = CHUNK_SIZE, draft: int | None = None
) -> Iterator[bytes]:
    """The blob of `state` as a stream: the prefix and header, then the body in `chunk_size` pieces. `draft`: the
    sequence's MTP draft (the guess for the token after its next one), kept when the blob carries the MTP."""
    pos = state.position
    if pos < 1:
        raise ValueError("export: the state holds no tokens")
    mtp = carried_mtp_layers(state)
    parts = []
    for prefix, layer, ls in _layer_states(model, state, mtp):
        for part, codec, rows in _parts(model, layer, pos):
            t = _part_tensor(ls, part, rows)
            if tuple(t.shape) != (rows, codec.width):
                raise ValueError(f"export: {prefix} {part} is {tuple(t.shape)}, expected {(rows, codec.width)}")
            encoded = codec.encode(t)
            parts += [
                encoded[f.name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for f in codec.fields
            ]
    specs = section_specs(model, pos, mtp)
    body = b"".join(parts)
    chunks = [body[o : o + chunk_size] for o in range(0, len(body), chunk_size)]
    header = {
        "format": "dsv4-kv",
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "position": pos,
        "mtp_layers": mtp,
        "mtp_draft": draft if mtp else None,
        "chunk_size": chunk_size,
        "body_bytes": len(body),
        "chunk_crc32c": [crc32c.crc32c(c) for c in chunks],
        "sections": [
            {"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape), "nbytes": s.nbytes}
            for s in specs
        ],
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    yield PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw), crc32c.crc32c(raw)) + raw
    yield from chunks


def read_header(blob: bytes | memoryview) -> tuple[dict[str, Any], int]:
    """Parse and verify the prefix and header; returns (header, offset of the body)."""
    blob = memoryview(blob)
    if len(blob) < PREFIX.size:
        raise KVFormatError(f"KV blob truncated: {len(blob)} bytes, shorter than its {PREFIX.size}-byte prefix")
    magic, version, header_len, header_crc = PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise KVFormatError(f"not a dsv4 KV blob (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise KVFormatError(f"KV format version {version}; this engine reads version {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES or PREFIX.size + header_len > len(blob):
        raise KVFormatError(f"KV blob truncated or corrupt: header of {header_len} bytes, blob of {len(blob)}")
    raw = bytes(blob[PREFIX.size : PREFIX.size + header_len])
    if crc32c.crc32c(raw) != header_crc:
        raise KVFormatError("KV blob header checksum mismatch (corrupted)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KVFormatError(f"KV blob header is not valid JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != "dsv4-kv":
        raise KVFormatError("KV blob header does not describe a dsv4-kv state")
    return header, PREFIX.size + header_len


def _field(header: dict[str, Any], key: str, kind: type) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KVFormatError(f"KV blob header: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def load(model: DeepseekV4, blob: bytes | memoryview) -> KVSnapshot:
    """Verify `blob` against `model` and parse it; raises KVFormatError saying what does not match."""
    blob = memoryview(blob)
    header, offset = read_header(blob)
    fingerprint = _field(header, "model_fingerprint", str)
    if fingerprint != model_fingerprint(model):
        raise KVFormatError(
            f"KV state was written by another model (fingerprint {fingerprint}, this engine {model_fingerprint(model)})"
        )
    pos = _field(header, "position", int)
    if not 1 <= pos <= model.cfg.max_position_embeddings:
        raise KVFormatError(f"KV blob position {pos} outside [1, {model.cfg.max_position_embeddings}]")
    mtp = header.get("mtp_layers", 0)  # absent in blobs written before MTP states were carried
    if not isinstance(mtp, int) or isinstance(mtp, bool) or not 0 <= mtp <= len(model.mtp):
        raise KVFormatError(
            f"KV blob carries the state of {mtp!r} MTP layers; this engine's model has {len(model.mtp)}"
        )
    draft = header.get("mtp_draft")
    valid_draft = isinstance(draft, int) and not isinstance(draft, bool) and 0 <= draft < model.cfg.vocab_size
    if draft is not None and (not mtp or not valid_draft):
        raise KVFormatError(
            f"KV blob header: 'mtp_draft' {draft!r} must be a token id below {model.cfg.vocab_size} of a blob that "
            "carries the MTP layers' state, or null"
        )
    expected = section_specs(model, pos, mtp)
    sections = _field(header, "sections", list)
    described = [
        (s.get("name"), s.get("dtype"), s.get("shape"), s.get("nbytes")) if isinstance(s, dict) else s for s in sections
    ]
    wanted = [(s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.nbytes) for s in expected]
    if described != wanted:
        bad = next((w for d, w in zip(described, wanted, strict=False) if d != w), None)
        raise KVFormatError(
            f"KV blob sections do not match a state at position {pos} of this model "
            f"({len(described)} sections, expected {len(wanted)}; first difference at {bad})"
        )
    body_bytes, chunk_size = _field(header, "body_bytes", int), _field(header, "chunk_size", int)
    crcs = _field(header, "chunk_crc32c", list)
    if body_bytes != sum(s.nbytes for s in expected) or chunk_size < 1:
        raise KVFormatError(f"KV blob header: body of {body_bytes} bytes does not match its sections")
    if len(blob) - offset != body_bytes:
        raise KVFormatError(
            f"KV blob truncated or padded: body has {len(blob) - offset} bytes, header says {body_bytes}"
        )
    if len(crcs) != math.ceil(body_bytes / chunk_size):
        raise KVFormatError(f"KV blob header lists {len(crcs)} chunk checksums for {body_bytes} bytes")
    body = blob[offset:]
    for k, crc in enumerate(crcs):
        if crc32c.crc32c(body[k * chunk_size : (k + 1) * chunk_size]) != crc:
            raise KVFormatError(f"KV blob chunk {k} checksum mismatch (corrupted)")
    tensors, at = {}, 0
    for spec in expected:
        data = bytearray(body[at : at + spec.nbytes])
        at += spec.nbytes
        t = torch.frombuffer(data, dtype=spec.dtype) if data else torch.empty(0, dtype=spec.dtype)
        tensors[spec.name] = t.view(spec.shape)
    return KVSnapshot(position=pos, tensors=tensors, mtp_layers=mtp, mtp_draft=draft)


def restore(model: DeepseekV4, snapshot: KVSnapshot, state: SequenceState) -> None:
    """Fill a fresh (position 0) state with a verified snapshot (its MTP layers' too, when it carries them and the
    state has them: the state's MTP then stands at the snapshot's position)."""
    if state.position != 0:
        raise ValueError("restore: the target state is not fresh")
    mtp = min(snapshot.mtp_layers, len(state.mtp_layers))
    dev = model.device
    for prefix, layer, ls in _layer_states(model, state, mtp):
        values = {}
        for part, codec, _ in _parts(model, layer, snapshot.position):
            stored = {f.name: snapshot.tensors[f"{prefix}.{part}.{f.name}"].to(dev) for f in codec.fields}
            values[part] = codec.decode(stored)
        ls.window.copy_(values["window"])
        if "entries" not in values:
            continue
        ls.append_entries(values["entries"], values.get("index_keys"))
        for name in ("comp_kv", "comp_score", "icomp_kv", "icomp_score"):
            if name in values:
                getattr(ls, name)[: values[name].shape[0]] = values[name]
    state.position = snapshot.position
    if mtp:
        state.mtp_position = snapshot.position
