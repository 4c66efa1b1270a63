"""KV-cache bytes per token of the engine's paged pool against the architecture's layouts (JSON lines).

For the Flash and Pro shapes (official config values), one line per layout: our pool (FP8 entries + MXFP4
indexer keys, BF16 RoPE dims; measured from the pool's allocated tensors, 1 block), the minimum the official
rounding leaves to store, vLLM's fp8 layout (584-byte
entries, 132-byte FP8 indexer keys: the research figures 3,850 / 5,511 B/token), the reference's BF16 cache, and
DeepSeek-V3.2's MLA cache (BF16 and FlashMLA FP8), each with `ratio` = bytes / vLLM fp8 layout. Then a measured
run of the tiny-flash model through the engine: pool bytes held per prompt token against the model's own dense
per-sequence state (fp32, unpaged) for the same prompt.

    .venv/bin/python bench/kv_memory.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.engine.kv_layout import sequence_constant_bytes
from dsv4.model_runtime.engine.kv_state import KVPool
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.state import new_sequence_state

BLOCK = 256  # vLLM's unified logical block for DeepSeek-V4
VLLM_ENTRY, VLLM_INDEX_KEY = 584, 132  # fp8_ds_mla-V4 head bytes; V3.2-style FP8 key (128 + fp32 scale)
V32_LAYERS, V32_BF16, V32_FP8 = 61, 576 * 2 + 128 * 2, 656 + 132  # MLA latent + rope (+ indexer key) per layer

_SHAPES: dict[str, dict[str, Any]] = {
    "flash": {"hidden_size": 4096, "num_hidden_layers": 43, "compress_ratios": [0, 0, *[4, 128] * 20, 4, 0]},
    "pro": {"hidden_size": 7168, "num_hidden_layers": 61, "compress_ratios": [128, 128, *[4, 128] * 29, 4, 0]},
}


def official_config(variant: str) -> ModelConfig:
    """The attention-relevant shape of the released Flash / Pro config.json (other fields do not touch the KV)."""
    return ModelConfig.from_dict(
        {
            "vocab_size": 129280,
            "num_attention_heads": 64,
            "head_dim": 512,
            "qk_rope_head_dim": 64,
            "q_lora_rank": 1024,
            "o_groups": 8,
            "o_lora_rank": 1024,
            "sliding_window": 128,
            "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
            "index_n_heads": 64,
            "index_head_dim": 128,
            "index_topk": 512,
            "n_routed_experts": 256,
            "num_experts_per_tok": 6,
            "moe_intermediate_size": 2048,
            "num_nextn_predict_layers": 1,
            **_SHAPES[variant],
        }
    )


def per_token(cfg: ModelConfig, entry: float, key: float) -> float:
    layers = range(cfg.num_hidden_layers)
    return sum((entry + (key if cfg.is_csa(i) else 0)) / cfg.ratio(i) for i in layers if cfg.ratio(i))


def shape_lines(variant: str) -> list[dict[str, Any]]:
    cfg = official_config(variant)
    pool = KVPool(cfg, 1, BLOCK, 1, torch.device("cpu"), torch.bfloat16, low_precision=True)
    allocated = sum(
        t.numel() * t.element_size()
        for store in [*pool.entries, *pool.index_keys]
        if store is not None
        for t in store.tensors.values()
    )
    ours = allocated / BLOCK
    vllm = per_token(cfg, VLLM_ENTRY, VLLM_INDEX_KEY)
    # What the official rounding leaves to store: 448 FP8 + 7 UE8M0 scales + 64 BF16 RoPE dims per entry, and
    # 64 bytes of e2m1 pairs + 4 UE8M0 scales per indexer key.
    minimum = per_token(cfg, cfg.nope_head_dim + cfg.nope_head_dim // 64 + 2 * cfg.qk_rope_head_dim, 68)
    layouts = {
        "architecture minimum (official rounding)": minimum,
        "dsv4 pool (fp8 entries + mxfp4 index keys)": ours,
        "vllm fp8 layout": vllm,
        "reference bf16 cache": per_token(cfg, 2 * cfg.head_dim, 2 * cfg.index_head_dim),
        "deepseek-v3.2 mla bf16": V32_LAYERS * V32_BF16,
        "deepseek-v3.2 mla fp8 (flashmla)": V32_LAYERS * V32_FP8,
    }
    return [
        {
            "bench": "kv_memory",
            "model": variant,
            "layout": name,
            "bytes_per_token": round(value, 2),
            "ratio_vs_vllm_fp8": round(value / vllm, 4),
            "ratio_vs_minimum": round(value / minimum, 4),
            "gib_at_1m_tokens": round(value * 2**20 / 2**30, 3),
            **({"per_sequence_constant_bytes": pool.slot_bytes} if name.startswith("dsv4") else {}),
        }
        for name, value in layouts.items()
    ]


def measured_lines() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", "tiny-flash", quantized=True)
        engine = LLMEngine.from_path(ckpt, config=EngineConfig(block_size=64, num_blocks=256))
        lines = []
        for n in (256, 1024):
            prompt = torch.randint(3, 128000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            seq = engine.add_request(f"m{n}", prompt, SamplingParams(max_tokens=1), export_after_prefill=True)
            while not seq.finished:
                engine.step()
            paged = engine.kv.used_blocks * engine.kv.pool.block_bytes
            dense = new_sequence_state(engine.model.cfg, engine.model.device, engine.model.dtype)
            engine.model.prefill(torch.tensor([prompt]), [dense])
            growing = dense.nbytes() - sequence_constant_bytes(engine.model.cfg, engine.model.dtype)
            lines.append(
                {
                    "bench": "kv_memory",
                    "model": "tiny-flash (measured, fp32 model)",
                    "prompt_tokens": n,
                    "pool_bytes_per_token": round(paged / n, 2),
                    "dense_state_bytes_per_token": round(growing / n, 2),
                    "ratio": round(paged / growing, 4),
                }
            )
            engine.release(seq)
        return lines


def main() -> None:
    for line in [*shape_lines("flash"), *shape_lines("pro"), *measured_lines()]:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
