"""`dsv4 plan` on the published Flash and Pro shapes. Every expected figure is derived here from the schema's
parameter counts and the formats' byte rules, independently of the planner's placement code."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.engine.kv_layout import bytes_per_token, sequence_constant_bytes
from dsv4.model_runtime.make_checkpoint import preset_config
from dsv4.model_runtime.plan import ACCELERATORS, GiB, Plan, kv_bytes_per_sequence, kv_bytes_per_token, plan
from dsv4.model_runtime.presets import published_config
from dsv4.model_runtime.schema import checkpoint_schema

pytestmark = pytest.mark.unit
# Published logical parameter counts (deepseek_v4_model.md §1.1, from the checkpoints' tensor inventories); they
# leave out the int64 tid2eid tables of the hash-routed layers.
PUBLISHED_PARAMETERS = {"flash": 290_942_289_362, "pro": 1_598_837_347_742}
TP_SPLIT = ("embed.weight", "head.weight", "attn.wq_b.weight", "attn.attn_sink", "attn.wo_a.weight", "attn.wo_b.weight")


def _cfg(model: str) -> ModelConfig:
    return ModelConfig.from_dict(published_config(model))


def _bytes(kind: str, shape: tuple[int, ...]) -> int:
    """Released storage: FP8 one byte + one scale byte per 128x128 block, MXFP4 half a byte + one per 32."""
    n = math.prod(shape)
    if kind == "fp8":
        return n + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
    if kind == "fp4":
        return n // 2 + n // 32
    return n * {"bf16": 2, "f32": 4, "i64": 8}[kind]


def _rank0_bytes(cfg: ModelConfig, world: int) -> int:
    """Rank 0 under TP=EP=world: experts 0..E/world-1 whole, the TP-split tensors and (when its rows split into
    whole 128-row blocks) the shared expert divided by world, everything else whole."""
    shared_split = (cfg.moe_intermediate_size // world) % 128 == 0
    total = 0
    for spec in checkpoint_schema(cfg):
        b = _bytes(spec.kind, spec.shape)
        name = spec.name
        if ".experts." in name:
            total += b if int(name.split(".experts.")[1].split(".")[0]) < cfg.n_routed_experts // world else 0
        elif ".shared_experts." in name:
            total += b // world if shared_split else b
        elif name.endswith(TP_SPLIT) and ".indexer." not in name:
            total += b // world
        else:
            total += b
    return total


def _check_capacity(p: Plan, cfg: ModelConfig, acc: str, world: int) -> None:
    """The KV figures follow from device memory, the derived weights and the planner's activation estimate."""
    assert p.weights_total == _rank0_bytes(cfg, world)
    memory, overhead = ACCELERATORS[acc].memory_bytes, ACCELERATORS[acc].overhead_bytes
    after = memory - overhead - p.weights_total
    pool = max(0, min(int(0.9 * after), after - p.activations))
    assert p.kv_pool == pool
    assert p.kv_tokens == int(pool // p.kv_bytes_per_token)
    one = math.ceil(p.context * p.kv_bytes_per_token) + p.kv_bytes_per_sequence
    assert p.sequences == pool // one
    assert p.fits == (overhead + p.weights_total + p.activations + one <= memory)


def test_published_shapes_match_the_published_parameter_counts() -> None:
    for model, count in PUBLISHED_PARAMETERS.items():
        specs = checkpoint_schema(_cfg(model))
        assert sum(math.prod(s.shape) for s in specs if s.kind != "i64") == count, model


def test_kv_bytes_match_the_runtime_formats() -> None:
    """The torch-free KV arithmetic equals the KV pool's own (kv_layout) for real and test shapes."""
    for cfg in (_cfg("flash"), _cfg("pro"), preset_config("flash-widths"), preset_config("tiny-pro")):
        for dtype in (torch.bfloat16, torch.float32):
            size = torch.empty(0, dtype=dtype).element_size()
            for low in (True, False):
                assert kv_bytes_per_token(cfg, size, low) == pytest.approx(bytes_per_token(cfg, dtype, low))
            assert kv_bytes_per_sequence(cfg, size, 1) == sequence_constant_bytes(cfg, dtype, 1)
    # Flash: 21 CSA layers (m = 4) with K=V entries of 448 FP8 + 7 scales + 64 bf16 RoPE dims and MXFP4 indexer
    # keys of 64 + 4 bytes, and 20 HCA layers (m = 128) with entries only.
    assert kv_bytes_per_token(_cfg("flash"), 2) == pytest.approx(21 * (583 + 68) / 4 + 20 * 583 / 128)


@pytest.mark.parametrize("devices", [8, 4])
def test_flash_fits_on_h200(devices: int) -> None:
    cfg = _cfg("flash")
    p = plan(cfg, "h200", devices, model="flash")
    assert p.fits and p.kv_tokens > 10_000_000
    _check_capacity(p, cfg, "h200", devices)
    assert f"fits: {p.kv_tokens:,} KV tokens per rank" in p.message


def test_pro_on_4_h200_is_refused_with_the_shortfall() -> None:
    cfg = _cfg("pro")
    p = plan(cfg, "h200", 4, model="pro")
    _check_capacity(p, cfg, "h200", 4)
    need = 4 * GiB + _rank0_bytes(cfg, 4) + p.activations + math.ceil(p.context * p.kv_bytes_per_token)
    need += p.kv_bytes_per_sequence
    shortfall = need - ACCELERATORS["h200"].memory_bytes
    assert not p.fits and p.shortfall == shortfall and shortfall > 60 * GiB  # a quarter of Pro is ~200 GiB
    assert f"short by {shortfall / GiB:.1f} GiB" in p.message


@pytest.mark.parametrize(("pods", "devices"), [(1, 8), (2, 8)])
def test_pro_fits_on_8_and_on_2x8_h200(pods: int, devices: int) -> None:
    cfg = _cfg("pro")
    p = plan(cfg, "h200", devices, pods, model="pro")
    assert p.fits and p.world == pods * devices
    _check_capacity(p, cfg, "h200", pods * devices)


def test_flash_on_8_910b_and_pro_on_16_910c() -> None:
    """Flash over 8 Ascend 910B (64 GB): a rank holds 1/8 of the experts and attention, ~20 GiB, so the KV pool
    gets most of the rest. Pro over 16 dies of 910C (64 GB each): 1/16 of Pro is ~50 GiB, but its shared expert's
    3072 rows do not split into whole 128-row FP8 blocks 16 ways (192 each), so rank 0 holds it whole (~4 GiB
    over 62 layers); with the runtime reserve and the activations of an 8192-token step the rank is short by a
    few GiB: the arithmetic says it does not fit at these settings."""
    flash = plan(_cfg("flash"), "910b", 8, model="flash")
    _check_capacity(flash, _cfg("flash"), "910b", 8)
    assert flash.fits
    pro = plan(_cfg("pro"), "910c", 16, model="pro")
    _check_capacity(pro, _cfg("pro"), "910c", 16)
    assert not pro.fits and 0 < pro.shortfall < 8 * GiB


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv4.services.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_exit_status_text_and_json(tmp_path: Path) -> None:
    refused = _cli("--preset", "pro", "--accelerator", "h200", "--devices-per-pod", "4")
    assert refused.returncode == 1 and "does not fit" in refused.stdout and "short by" in refused.stdout
    ok = _cli("--preset", "flash", "--accelerator", "h200", "--devices-per-pod", "8", "--json")
    assert ok.returncode == 0
    doc: dict[str, Any] = json.loads(ok.stdout)
    assert doc["fits"] and doc["kv_tokens"] > 0 and set(doc["weights"]) == {"fp8", "mxfp4", "bf16", "other"}
    (tmp_path / "config.json").write_text(json.dumps(published_config("flash")))
    same = _cli("--config", str(tmp_path), "--accelerator", "h200", "--devices-per-pod", "8", "--json")
    assert json.loads(same.stdout)["kv_tokens"] == doc["kv_tokens"]
    bad = _cli("--preset", "flash", "--accelerator", "h200", "--devices-per-pod", "8", "--tensor", "3")
    assert bad.returncode == 2 and "tensor 3 x data 1 = 3 ranks" in bad.stderr


def test_plan_imports_no_torch() -> None:
    """The operator imports the planner and must never import torch."""
    code = (
        "import sys; from dsv4.model_runtime.plan import plan; from dsv4.model_runtime.presets import "
        "published_config; from dsv4.model_runtime.config import ModelConfig; "
        "plan(ModelConfig.from_dict(published_config('flash')), 'h200', 8); assert 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
