"""Every tensor of an official DeepSeek-V4 checkpoint for a given config: name, logical shape, storage kind.

One table shared by the checkpoint writer and the loader. Kinds: "fp8" (F8_E4M3 + 128x128 `.scale` in quantized
releases), "fp4" (routed experts: I8-packed MXFP4 + per-32 `.scale`), "bf16", "f32", "i64". In unquantized
checkpoints the "fp8" and "fp4" tensors are stored as BF16 without `.scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv4.model_runtime.config import ModelConfig

Kind = Literal["fp8", "fp4", "bf16", "f32", "i64"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # logical (dequantized) shape
    kind: Kind


def layer_schema(cfg: ModelConfig, layer: int, prefix: str) -> list[TensorSpec]:
    """Tensors of decoder block `layer` (MTP block i is layer num_hidden_layers + i) under `prefix`."""
    d, c, n = cfg.hidden_size, cfg.head_dim, cfg.hc_mult
    H, ic, E, inter = cfg.num_attention_heads, cfg.index_head_dim, cfg.n_routed_experts, cfg.moe_intermediate_size
    mix = (2 + n) * n
    specs = [
        TensorSpec(f"{prefix}attn_norm.weight", (d,), "bf16"),
        TensorSpec(f"{prefix}ffn_norm.weight", (d,), "bf16"),
    ]
    for part in ("attn", "ffn"):
        specs += [
            TensorSpec(f"{prefix}hc_{part}_fn", (mix, n * d), "f32"),
            TensorSpec(f"{prefix}hc_{part}_base", (mix,), "f32"),
            TensorSpec(f"{prefix}hc_{part}_scale", (3,), "f32"),
        ]
    a = f"{prefix}attn."
    specs += [
        TensorSpec(f"{a}attn_sink", (H,), "f32"),
        TensorSpec(f"{a}wq_a.weight", (cfg.q_lora_rank, d), "fp8"),
        TensorSpec(f"{a}q_norm.weight", (cfg.q_lora_rank,), "bf16"),
        TensorSpec(f"{a}wq_b.weight", (H * c, cfg.q_lora_rank), "fp8"),
        TensorSpec(f"{a}wkv.weight", (c, d), "fp8"),
        TensorSpec(f"{a}kv_norm.weight", (c,), "bf16"),
        TensorSpec(f"{a}wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, H * c // cfg.o_groups), "fp8"),
        TensorSpec(f"{a}wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank), "fp8"),
    ]
    ratio = cfg.ratio(layer)
    if ratio:
        coff = 2 if cfg.is_csa(layer) else 1
        specs += _compressor(f"{a}compressor.", ratio, coff * c, c, d)
    if cfg.is_csa(layer):
        specs += [
            TensorSpec(f"{a}indexer.wq_b.weight", (cfg.index_n_heads * ic, cfg.q_lora_rank), "fp8"),
            TensorSpec(f"{a}indexer.weights_proj.weight", (cfg.index_n_heads, d), "bf16"),
            *_compressor(f"{a}indexer.compressor.", ratio, 2 * ic, ic, d),
        ]
    f = f"{prefix}ffn."
    specs.append(TensorSpec(f"{f}gate.weight", (E, d), "bf16"))
    if cfg.is_hash_layer(layer):
        specs.append(TensorSpec(f"{f}gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "i64"))
    else:
        specs.append(TensorSpec(f"{f}gate.bias", (E,), "f32"))
    for e in range(E):
        specs += [
            TensorSpec(f"{f}experts.{e}.w1.weight", (inter, d), "fp4"),
            TensorSpec(f"{f}experts.{e}.w2.weight", (d, inter), "fp4"),
            TensorSpec(f"{f}experts.{e}.w3.weight", (inter, d), "fp4"),
        ]
    if cfg.n_shared_experts:
        specs += [
            TensorSpec(f"{f}shared_experts.w1.weight", (inter, d), "fp8"),
            TensorSpec(f"{f}shared_experts.w2.weight", (d, inter), "fp8"),
            TensorSpec(f"{f}shared_experts.w3.weight", (inter, d), "fp8"),
        ]
    return specs


def _compressor(p: str, ratio: int, width: int, c: int, d: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{p}ape", (ratio, width), "f32"),
        TensorSpec(f"{p}wkv.weight", (width, d), "bf16"),
        TensorSpec(f"{p}wgate.weight", (width, d), "bf16"),
        TensorSpec(f"{p}norm.weight", (c,), "bf16"),
    ]


def hc_head_schema(cfg: ModelConfig, prefix: str) -> list[TensorSpec]:
    n, d = cfg.hc_mult, cfg.hidden_size
    return [
        TensorSpec(f"{prefix}hc_head_fn", (n, n * d), "f32"),
        TensorSpec(f"{prefix}hc_head_base", (n,), "f32"),
        TensorSpec(f"{prefix}hc_head_scale", (1,), "f32"),
    ]


def mtp_schema(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    """Tensors of MTP module i (`mtp.i.`): an SWA block plus its projections, norms and hyper head."""
    d, p = cfg.hidden_size, f"mtp.{i}."
    return [
        *layer_schema(cfg, cfg.num_hidden_layers + i, p),
        TensorSpec(f"{p}e_proj.weight", (d, d), "fp8"),
        TensorSpec(f"{p}h_proj.weight", (d, d), "fp8"),
        TensorSpec(f"{p}enorm.weight", (d,), "bf16"),
        TensorSpec(f"{p}hnorm.weight", (d,), "bf16"),
        TensorSpec(f"{p}norm.weight", (d,), "bf16"),
        *hc_head_schema(cfg, p),
    ]


def checkpoint_schema(cfg: ModelConfig, include_mtp: bool = True) -> list[TensorSpec]:
    """All tensors of the checkpoint in file order: embed, layers, final norm/head, then MTP."""
    d = cfg.hidden_size
    specs = [TensorSpec("embed.weight", (cfg.vocab_size, d), "bf16")]
    for layer in range(cfg.num_hidden_layers):
        specs += layer_schema(cfg, layer, f"layers.{layer}.")
    specs += [
        TensorSpec("norm.weight", (d,), "bf16"),
        TensorSpec("head.weight", (cfg.vocab_size, d), "bf16"),
        *hc_head_schema(cfg, ""),
    ]
    if include_mtp:
        for i in range(cfg.num_nextn_predict_layers):
            specs += mtp_schema(cfg, i)
    return specs
