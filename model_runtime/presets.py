"""Small model shapes for tests and the embedded default model, with Flash- and Pro-like layer schedules.

Dims obey the official constraints (non-RoPE head dims a multiple of 64, FP8 layers fed by multiples of 128,
index_head_dim a power of two) and keep the real vocabulary (129280) so the real tokenizer works.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "vocab_size": 129280,
    "num_attention_heads": 4,
    "head_dim": 128,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 128,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 1048576,
    "index_n_heads": 16,  # >= 16 heads keeps exact-zero indexer ties rare (oracle_notes §7)
    "index_head_dim": 128,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Flash schedule: SWA, SWA, then CSA/HCA alternating; MTP layer SWA.
    "tiny-flash": {
        **_COMMON,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "compress_ratios": [0, 0, 4, 8, 0],
        "sliding_window": 16,
        "index_topk": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "num_hash_layers": 2,
        "routed_scaling_factor": 1.5,
    },
    # Pro schedule: HCA, HCA, then CSA/HCA alternating; MTP layer SWA.
    "tiny-pro": {
        **_COMMON,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "compress_ratios": [8, 8, 4, 8, 0],
        "sliding_window": 16,
        "index_topk": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "num_hash_layers": 1,
        "routed_scaling_factor": 2.5,
    },
    "small-flash": {
        **_COMMON,
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "head_dim": 256,
        "q_lora_rank": 256,
        "o_groups": 4,
        "o_lora_rank": 256,
        "compress_ratios": [0, 0, 4, 16, 4, 16, 0],
        "sliding_window": 64,
        "index_topk": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 256,
        "num_hash_layers": 2,
        "routed_scaling_factor": 1.5,
    },
    # Flash's real widths (hidden 4096, 64 heads x 512, q/o LoRA ranks, indexer 64 x 128, experts 2048 wide,
    # window 128, ratios 4 and 128) with one layer of each kind (SWA, CSA, HCA), the MTP layer and 16 experts:
    # every weight shape of a layer is Flash's, so sharding, packing and kernels see the real sizes (a few GB).
    "flash-widths": {
        **_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 3,
        "num_attention_heads": 64,
        "head_dim": 512,
        "q_lora_rank": 1024,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "compress_ratios": [0, 4, 128, 0],
        "sliding_window": 128,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "n_routed_experts": 16,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048,
        "num_hash_layers": 1,
        "routed_scaling_factor": 1.5,
    },
}

QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def published_config(model: str) -> dict[str, Any]:
    """The released config.json of DeepSeek-V4 `model` ("flash" or "pro"): the values of the Hugging Face
    repositories deepseek-ai/DeepSeek-V4-Flash and -Pro (April 2026 release), for planning without a download."""
    if model not in ("flash", "pro"):
        raise ValueError(f"unknown published model {model!r}; choose flash or pro")
    flash = model == "flash"
    n = 43 if flash else 61
    body = [r for _ in range((n - 3) // 2) for r in (4, 128)] + [4]  # CSA/HCA alternating, CSA last
    return {
        **_COMMON,
        "hidden_size": 4096 if flash else 7168,
        "num_hidden_layers": n,
        "num_attention_heads": 64 if flash else 128,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024 if flash else 1536,
        "o_groups": 8 if flash else 16,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": ([0, 0] if flash else [128, 128]) + body + [0],
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512 if flash else 1024,
        "n_routed_experts": 256 if flash else 384,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048 if flash else 3072,
        "num_hash_layers": 3,
        "routed_scaling_factor": 1.5 if flash else 2.5,
        "quantization_config": dict(QUANTIZATION_CONFIG),
    }
