"""Parsing the official config.json: Flash, Pro, consistent custom values; clear errors for inconsistent ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4.model_runtime.config import ConfigError, ModelConfig
from dsv4.model_runtime.layers.rope import inv_freq
from dsv4.model_runtime.make_checkpoint import preset_config
from dsv4.model_runtime.presets import QUANTIZATION_CONFIG

pytestmark = pytest.mark.unit

YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}


def official(kind: str) -> dict[str, Any]:
    """The released config.json values (deepseek_v4_model.md §1.1)."""
    flash = kind == "flash"
    n = 43 if flash else 61
    body = [r for _ in range((n - 3) // 2) for r in (4, 128)] + [4]
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 129280,
        "hidden_size": 4096 if flash else 7168,
        "num_hidden_layers": n,
        "num_attention_heads": 64 if flash else 128,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024 if flash else 1536,
        "o_groups": 8 if flash else 16,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": ([0, 0] if flash else [128, 128]) + body + [0],
        "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": YARN,
        "max_position_embeddings": 1048576,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512 if flash else 1024,
        "n_routed_experts": 256 if flash else 384,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048 if flash else 3072,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5 if flash else 2.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": QUANTIZATION_CONFIG,
        "torch_dtype": "bfloat16",
        "attention_bias": False,
    }


def test_flash_schedule() -> None:
    cfg = ModelConfig.from_dict(official("flash"))
    n = cfg.num_hidden_layers
    assert len(cfg.compress_ratios) == n + 1 and cfg.ratio(n) == 0  # MTP layer: sliding window only
    assert [cfg.ratio(i) for i in range(4)] == [0, 0, 4, 128]
    assert sum(cfg.is_csa(i) for i in range(n)) == 21
    assert sum(cfg.ratio(i) == 128 for i in range(n)) == 20
    assert [cfg.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert cfg.nope_head_dim == 448


def test_pro_schedule() -> None:
    cfg = ModelConfig.from_dict(official("pro"))
    n = cfg.num_hidden_layers
    assert [cfg.ratio(i) for i in range(3)] == [128, 128, 4]
    assert sum(cfg.is_csa(i) for i in range(n)) == 30 and sum(cfg.ratio(i) == 128 for i in range(n)) == 31
    assert cfg.index_topk == 1024 and cfg.routed_scaling_factor == 2.5


def test_yarn_table_matches_the_spec() -> None:
    """θ=160000, factor 16: pairs 0..15 unchanged, 25..31 divided by 16 (deepseek_v4_model.md §3.4.1)."""
    cfg = ModelConfig.from_dict(official("flash"))
    plain = 1.0 / (160000.0 ** (2 * torch.arange(32).double() / 64))
    yarn = inv_freq(cfg, compressed=True).double()
    assert (yarn[:16] / plain[:16] - 1).abs().max() < 1e-6
    assert (yarn[25:] * 16 / plain[25:] - 1).abs().max() < 1e-6
    assert ((yarn[16:25] / plain[16:25]) < 1).all()
    swa = inv_freq(cfg, compressed=False).double()
    assert (swa / (1.0 / (10000.0 ** (2 * torch.arange(32).double() / 64))) - 1).abs().max() < 1e-6


def test_custom_small_hca_ratio_round_trips(tmp_path: Path) -> None:
    cfg = preset_config("tiny-pro", quantized=True)
    assert cfg.hca_ratios == {8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_file(tmp_path) == cfg


def test_mtp_ratios_default_to_sliding_window() -> None:
    raw = official("flash")
    raw["compress_ratios"] = raw["compress_ratios"][:-1]
    assert ModelConfig.from_dict(raw).ratio(43) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "'hidden_size' must be a positive integer"),
        ({"compress_ratios": [0, 4]}, "'compress_ratios' has 2 entries but num_hidden_layers is 43"),
        ({"compress_ratios": "4,128"}, "'compress_ratios' must be a list"),
        ({"num_attention_heads": 60}, "'num_attention_heads' (60) must be a multiple of 'o_groups' (8)"),
        ({"num_experts_per_tok": 300}, "'num_experts_per_tok' (300) exceeds 'n_routed_experts'"),
        ({"qk_rope_head_dim": 96}, "must be a multiple of 64"),
        ({"index_head_dim": 96}, "'index_head_dim' (96) must be a power of two"),
        ({"scoring_func": "softmax"}, "'scoring_func' must be 'sqrtsoftplus'"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "'rope_scaling.type' must be 'yarn'"),
        ({"num_hash_layers": 50}, "'num_hash_layers' (50) must be in [0, num_hidden_layers]"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
    ],
)
def test_inconsistent_values_name_the_key(change: dict[str, Any], message: str) -> None:
    raw = official("flash") | change
    if change.get("hidden_size", 0) is None:
        raw.pop("hidden_size")
        message = "missing required key 'hidden_size'"
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(raw)
    assert message in str(err.value)


def test_bad_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)
