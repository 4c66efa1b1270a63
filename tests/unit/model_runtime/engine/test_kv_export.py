"""KV export/import: exact continuation after a round trip, and refusal of every damaged or foreign blob."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.kv_export import KVFormatError, export_state, load, restore
from dsv4.model_runtime.engine.llm_engine import LLMEngine
from dsv4.model_runtime.engine.port import KVImportError
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.weights import load_model

pytestmark = pytest.mark.unit

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _prefill_export(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[int, bytes]:
    seq = engine.add_request("p", prompt, params, export_after_prefill=True)
    while not seq.finished:
        engine.step()
    assert seq.state is not None and seq.state.position == len(prompt)
    blob = export_state(engine.model, seq.state)
    engine.release(seq)
    return seq.output_token_ids[0], blob


def _continue(engine: LLMEngine, prompt: list[int], params: SamplingParams, first: int, blob: bytes) -> list[int]:
    seq = engine.add_request("d", prompt, params, output_token_ids=[first], snapshot=load(engine.model, blob))
    while not seq.finished:
        engine.step()
    return seq.output_token_ids


@pytest.fixture(scope="module")
def blob(make_engine: Callable[..., LLMEngine]) -> bytes:
    return _prefill_export(make_engine(), list(range(100, 121)), PARAMS)[1]


@pytest.mark.parametrize("length", [3, 8, 16, 21])
def test_round_trip_continues_exactly(length: int, make_engine: Callable[..., LLMEngine]) -> None:
    prompt = [(37 * k + 11) % 128000 for k in range(length)]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True)
    expected = make_engine().generate_ids([prompt], params)[0].token_ids
    first, blob = _prefill_export(make_engine(), prompt, params)
    assert first == expected[0]
    assert _continue(make_engine(), prompt, params, first, blob) == expected


def test_header_is_self_describing(blob: bytes, model: DeepseekV4) -> None:
    header, offset = kv_export.read_header(blob)
    assert header["format_version"] == kv_export.FORMAT_VERSION
    assert header["model_fingerprint"] == kv_export.model_fingerprint(model)
    assert header["position"] == 21
    names = [s["name"] for s in header["sections"]]
    # tiny-flash: SWA, SWA, CSA (m=4), HCA (m=8); K=V rows as FP8 + UE8M0 scales + RoPE dims, keys as MXFP4.
    assert names[:6] == [f"layers.{i}.window.{f}" for i in (0, 1) for f in ("fp8", "scale", "rope")]
    shapes = {s["name"]: (s["dtype"], s["shape"]) for s in header["sections"]}
    assert shapes["layers.2.entries.fp8"] == ("uint8", [5, 64]) and shapes["layers.2.entries.scale"] == (
        "uint8",
        [5, 1],
    )
    assert shapes["layers.2.entries.rope"] == ("float32", [5, 64])
    assert shapes["layers.2.index_keys.fp4"] == ("uint8", [5, 64]) and shapes["layers.2.index_keys.scale"][1] == [5, 4]
    assert shapes["layers.3.entries.fp8"][1] == [2, 64] and shapes["layers.3.comp_kv.value"] == ("float32", [5, 128])
    assert shapes["layers.2.comp_kv.value"][1] == [4 + 1, 256]
    assert len(blob) - offset == header["body_bytes"] == sum(s["nbytes"] for s in header["sections"])


def test_round_trip_restores_the_state_exactly(model: DeepseekV4) -> None:
    ids = torch.randint(3, 128000, (1, 29), generator=torch.Generator().manual_seed(1))
    state = model.new_state()
    model.prefill(ids, [state])
    copy = model.new_state()
    restore(model, load(model, export_state(model, state)), copy)
    assert copy.position == state.position == 29
    for a, b in zip(state.layers, copy.layers, strict=True):
        assert a.n_entries == b.n_entries
        assert torch.equal(a.window, b.window)
        assert torch.equal(a.valid_entries(), b.valid_entries())
        assert torch.equal(a.valid_index_keys(), b.valid_index_keys())
        for name in ("comp_kv", "comp_score", "icomp_kv", "icomp_score"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def _rewrite_header(blob: bytes, edit: Callable[[dict], None], version: int = kv_export.FORMAT_VERSION) -> bytes:
    header, offset = kv_export.read_header(blob)
    edit(header)
    raw = json.dumps(header).encode()
    return kv_export.PREFIX.pack(kv_export.MAGIC, version, len(raw), crc32c.crc32c(raw)) + raw + blob[offset:]


def test_refusals_say_what_is_wrong(blob: bytes, model: DeepseekV4) -> None:
    cases = {
        "version 2": _rewrite_header(blob, lambda h: None, version=2),
        "another model": _rewrite_header(blob, lambda h: h.update(model_fingerprint="0" * 32)),
        "sections do not match": _rewrite_header(blob, lambda h: h.update(position=22)),
        "truncated": blob[:-1],
        "padded": blob + b"\0",
        "not a dsv4 KV blob": b"GARBAGE!" + blob[8:],
        "chunk 0 checksum": blob[:-5] + bytes([blob[-5] ^ 0x10]) + blob[-4:],
    }
    for expect, bad in cases.items():
        with pytest.raises(KVImportError) as info:
            load(model, bad)
        assert isinstance(info.value, ValueError)
        words = expect.split()
        assert all(w in str(info.value) for w in words if w not in ("not", "a")), (expect, str(info.value))


def test_blob_of_another_model_is_refused(tmp_path: Path, blob: bytes) -> None:
    other = load_model(write_checkpoint(tmp_path / "pro", "tiny-pro", quantized=True, seed=0))
    with pytest.raises(KVFormatError, match="another model"):
        load(other, blob)
    no_qat = load_model(
        write_checkpoint(tmp_path / "flash", "tiny-flash", quantized=True, seed=0), qat_simulation=False
    )
    with pytest.raises(KVFormatError, match="another model"):
        load(no_qat, blob)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_blobs_are_refused(blob: bytes, model: DeepseekV4, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        bits = data.draw(st.lists(st.integers(0, 8 * len(blob) - 1), min_size=1, max_size=3, unique=True))
        arr = bytearray(blob)
        for b in bits:
            arr[b // 8] ^= 1 << (b % 8)
        bad = bytes(arr)
    else:
        at = data.draw(st.integers(0, len(blob)))
        bad = blob[:at] + data.draw(st.binary(min_size=1, max_size=64)) + blob[at:]
    with pytest.raises(KVFormatError):
        load(model, bad)


def test_prefix_layout_is_documented(blob: bytes) -> None:
    magic, version, header_len, _ = struct.unpack_from("<8sIII", blob)
    assert magic == b"DSV4-KV\n" and version == 1
    assert json.loads(blob[20 : 20 + header_len])["format"] == "dsv4-kv"
