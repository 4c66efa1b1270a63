"""The model configuration: the official Hugging Face `config.json` of DeepSeek-V4, parsed and checked.

`ModelConfig.from_dict` accepts the official keys (Flash, Pro, and any consistent custom values) and raises
`ConfigError` naming the offending key when the values cannot describe a working model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CSA_RATIO = 4  # the official code treats ratio 4 as CSA and any other non-zero ratio as HCA


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-V4 model; the message names the key."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN parameters of the compressed layers' RoPE table (`rope_scaling` in config.json)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Every field of the official config.json that the forward pass depends on (names as in config.json)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]  # one per layer, then one per MTP layer
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: YarnScaling | None
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    num_nextn_predict_layers: int
    scoring_func: str = "sqrtsoftplus"
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (index num_hidden_layers + i is MTP layer i): 0 = SWA only."""
        return self.compress_ratios[layer]

    def is_csa(self, layer: int) -> bool:
        return self.compress_ratios[layer] == CSA_RATIO

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def hca_ratios(self) -> set[int]:
        return {r for r in self.compress_ratios[: self.num_hidden_layers] if r not in (0, CSA_RATIO)}

    # ---- parsing ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse the official config.json dict; raise ConfigError naming the key on missing or bad values."""

        def get(key: str, default: Any = ...) -> Any:
            if key in raw:
                return raw[key]
            if default is ...:
                raise ConfigError(f"config.json: missing required key {key!r}")
            return default

        def pos_int(key: str, default: Any = ...) -> int:
            value = get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {key!r} must be a positive integer, got {value!r}")
            return value

        n_layers = pos_int("num_hidden_layers")
        n_mtp = get("num_nextn_predict_layers", 0)
        if not isinstance(n_mtp, int) or n_mtp < 0:
            raise ConfigError(f"config.json: 'num_nextn_predict_layers' must be an integer >= 0, got {n_mtp!r}")
        ratios = get("compress_ratios")
        if not isinstance(ratios, list) or not all(isinstance(r, int) and r >= 0 for r in ratios):
            raise ConfigError(f"config.json: 'compress_ratios' must be a list of integers >= 0, got {ratios!r}")
        if len(ratios) < n_layers:
            raise ConfigError(
                f"config.json: 'compress_ratios' has {len(ratios)} entries but num_hidden_layers is {n_layers}"
            )
        if len(ratios) < n_layers + n_mtp:
            ratios = ratios + [0] * (n_layers + n_mtp - len(ratios))  # MTP layers are sliding-window layers
        rope_scaling = get("rope_scaling", None)
        yarn: YarnScaling | None = None
        if rope_scaling is not None:
            kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"config.json: 'rope_scaling.type' must be 'yarn', got {kind!r}")
            yarn = YarnScaling(
                factor=float(rope_scaling["factor"]),
                original_max_position_embeddings=int(rope_scaling["original_max_position_embeddings"]),
                beta_fast=float(rope_scaling.get("beta_fast", 32)),
                beta_slow=float(rope_scaling.get("beta_slow", 1)),
            )
        n_shared = get("n_shared_experts", 1)
        cfg = cls(
            vocab_size=pos_int("vocab_size"),
            hidden_size=pos_int("hidden_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=pos_int("num_attention_heads"),
            head_dim=pos_int("head_dim"),
            qk_rope_head_dim=pos_int("qk_rope_head_dim"),
            q_lora_rank=pos_int("q_lora_rank"),
            o_groups=pos_int("o_groups"),
            o_lora_rank=pos_int("o_lora_rank"),
            sliding_window=pos_int("sliding_window"),
            compress_ratios=tuple(ratios[: n_layers + n_mtp]),
            rope_theta=float(get("rope_theta", 10000.0)),
            compress_rope_theta=float(get("compress_rope_theta", 160000.0)),
            rope_scaling=yarn,
            index_n_heads=pos_int("index_n_heads"),
            index_head_dim=pos_int("index_head_dim"),
            index_topk=pos_int("index_topk"),
            n_routed_experts=pos_int("n_routed_experts"),
            n_shared_experts=n_shared,
            num_experts_per_tok=pos_int("num_experts_per_tok"),
            moe_intermediate_size=pos_int("moe_intermediate_size"),
            num_hash_layers=int(get("num_hash_layers", 0)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            swiglu_limit=float(get("swiglu_limit", 10.0)),
            hc_mult=pos_int("hc_mult", 4),
            hc_sinkhorn_iters=pos_int("hc_sinkhorn_iters", 20),
            hc_eps=float(get("hc_eps", 1e-6)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            num_nextn_predict_layers=n_mtp,
            scoring_func=str(get("scoring_func", "sqrtsoftplus")),
            max_position_embeddings=int(get("max_position_embeddings", 1048576)),
            bos_token_id=int(get("bos_token_id", 0)),
            eos_token_id=int(get("eos_token_id", 1)),
            quantization_config=get("quantization_config", None),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or the config.json inside a checkpoint folder)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{p}: no config.json") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e

    def validate(self) -> None:
        """Cross-field consistency checks; each error names the keys involved and the rule.

        Block alignment of weights is not checked here: it depends on how a checkpoint stores each tensor (an
        MXFP4 expert needs whole 32-column blocks, a BF16 one does not), so the loader checks it per tensor."""

        def fail(msg: str) -> None:
            raise ConfigError(f"config.json: {msg}")

        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            fail(f"'qk_rope_head_dim' ({self.qk_rope_head_dim}) must be even and <= 'head_dim' ({self.head_dim})")
        if self.qk_rope_head_dim > self.index_head_dim:
            fail(f"'qk_rope_head_dim' ({self.qk_rope_head_dim}) must be <= 'index_head_dim' ({self.index_head_dim})")
        if self.num_attention_heads % self.o_groups:
            fail(
                f"'num_attention_heads' ({self.num_attention_heads}) must be a multiple of 'o_groups' ({self.o_groups})"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            fail(
                f"'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds 'n_routed_experts' "
                f"({self.n_routed_experts})"
            )
        if self.n_shared_experts not in (0, 1):
            fail(f"'n_shared_experts' must be 0 or 1, got {self.n_shared_experts}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            fail(f"'num_hash_layers' ({self.num_hash_layers}) must be in [0, num_hidden_layers]")
        if self.scoring_func != "sqrtsoftplus":
            fail(f"'scoring_func' must be 'sqrtsoftplus' for DeepSeek-V4, got {self.scoring_func!r}")
        if self.hc_mult < 1:
            fail("'hc_mult' must be >= 1")
        if self.index_head_dim & (self.index_head_dim - 1):
            fail(f"'index_head_dim' ({self.index_head_dim}) must be a power of two (Hadamard rotation)")
        if any(r == CSA_RATIO for r in self.compress_ratios[: self.num_hidden_layers]) and self.index_head_dim % 32:
            fail(
                f"'index_head_dim' ({self.index_head_dim}) must be a multiple of 32: the KV cache stores CSA indexer "
                "keys as MXFP4, one scale per 32 values"
            )
        if self.nope_head_dim % 64:
            fail(
                f"'head_dim' - 'qk_rope_head_dim' ({self.nope_head_dim}) must be a multiple of 64 "
                "(FP8 round-trip blocks of the K=V cache)"
            )
        if self.rope_scaling is not None and self.rope_scaling.factor <= 0:
            fail("'rope_scaling.factor' must be > 0")
        if self.rope_scaling is None and any(self.compress_ratios):
            fail("'rope_scaling' (yarn) is required when any layer is compressed")
        if self.quantization_config is not None:
            qc = self.quantization_config
            if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                fail(f"'quantization_config' must be fp8 with weight_block_size [128, 128], got {qc}")

    def to_dict(self) -> dict[str, Any]:
        """The official config.json dict (what `from_dict` reads back)."""
        d = asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        yarn = d.pop("rope_scaling")
        d["rope_scaling"] = None if yarn is None else {"type": "yarn", **yarn}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d.update(
            architectures=["DeepseekV4ForCausalLM"],
            model_type="deepseek_v4",
            num_key_value_heads=1,
            topk_method="noaux_tc",
            norm_topk_prob=True,
            hidden_act="silu",
            tie_word_embeddings=False,
            attention_bias=False,
            torch_dtype="bfloat16",
        )
        return d


def yarn_correction_range(cfg: ModelConfig, rope_dim: int, theta: float) -> tuple[int, int]:
    """The YaRN (low, high) pair indices between which frequencies ramp from unscaled to scaled."""
    assert cfg.rope_scaling is not None
    y = cfg.rope_scaling

    def dim_for(rotations: float) -> float:
        return (
            rope_dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        )

    low = max(math.floor(dim_for(y.beta_fast)), 0)
    high = min(math.ceil(dim_for(y.beta_slow)), rope_dim - 1)
    return low, high
