"""`dsv4 plan`: will a model fit a parallel layout on an accelerator? Torch-free arithmetic, shared by the CLI and
the operator (which must not import torch), over the same tables the runtime uses: the checkpoint schema, the
placement of every tensor on the ranks (`placement`), the stored formats (`storage`) and the KV cache formats.

Per rank (the largest one; rank 0 holds the shared expert): weight bytes by class, a reserve for the runtime and
the activations of one step, the KV cache bytes per token and per sequence, and how many tokens and sequences of
`context` tokens the rest holds. The runtime sizes its KV pool as `kv_fraction` of the free memory after the
weights load (`engine.kv_budget`); the plan also keeps the activation reserve out of the pool.

The reserve is an estimate, not a measurement: `overhead_bytes` of the accelerator (context, library
workspaces, collective buffers) plus the largest live activations of one step of `max_batch_tokens` tokens
(residual streams, attention, routed-expert rows, indexer scores over `context`, fp32 logits of `max_seqs`
rows).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dsv4.model_runtime.config import CSA_RATIO, ModelConfig
from dsv4.model_runtime.placement import Layout, PlacementError, place
from dsv4.model_runtime.schema import checkpoint_schema
from dsv4.model_runtime.storage import released_format, stored_bytes, weight_class

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Accelerator:
    """One device as the runtime sees it: the memory the driver reports, and the reserve the runtime keeps."""

    name: str
    description: str
    memory_bytes: int
    overhead_bytes: int


# Memory per device as the driver reports it (nvidia-smi total; npu-smi HBM), one table for the CLI and operator.
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("h100", "NVIDIA H100 SXM 80 GB", 81559 * MiB, 4 * GiB),
    "h200": Accelerator("h200", "NVIDIA H200 141 GB", 143771 * MiB, 4 * GiB),
    "b200": Accelerator("b200", "NVIDIA B200 180 GB", 183359 * MiB, 4 * GiB),
    "910b": Accelerator("910b", "Huawei Ascend 910B, 64 GB HBM", 65536 * MiB, 4 * GiB),
    "910c": Accelerator("910c", "Huawei Ascend 910C, one 64 GB die (a package holds two)", 65536 * MiB, 4 * GiB),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_FRACTION = 0.9  # the runtime's default share of the free memory after loading (engine.kv_budget)
MAX_BATCH_TOKENS = 8192
MAX_SEQS = 256
CONTEXT = 131072


@dataclass(frozen=True)
class Plan:
    """The verdict and every figure behind it (bytes unless named otherwise)."""

    model: str
    accelerator: str
    devices_per_pod: int
    pods: int
    layout: str
    world: int
    dtype: str
    largest_rank: int
    weights: dict[str, int]  # by class (fp8, mxfp4, bf16, other) on the largest rank
    weights_total: int
    weights_all_ranks: int
    device_memory: int
    overhead: int
    activations: int
    kv_bytes_per_token: float
    kv_bytes_per_sequence: int  # the per-sequence constant: window rings and compressor state
    context: int
    kv_pool: int
    kv_tokens: int
    sequences: int
    fits: bool
    shortfall: int
    message: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class PlanError(ValueError):
    """Inputs that describe no layout (unknown accelerator, devices that do not match the layout)."""


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, low_precision: bool = True) -> float:
    """KV pool bytes per context token (as `engine.kv_layout.bytes_per_token`): compressed K=V entries (FP8 e4m3
    non-RoPE dims + one UE8M0 scale per 64 + RoPE dims in the compute dtype) and CSA indexer keys (MXFP4)."""
    nope = cfg.head_dim - cfg.qk_rope_head_dim
    if low_precision:
        entry = nope + nope // 64 + cfg.qk_rope_head_dim * dtype_bytes
        key = cfg.index_head_dim // 2 + cfg.index_head_dim // 32
    else:
        entry, key = cfg.head_dim * dtype_bytes, cfg.index_head_dim * dtype_bytes
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        m = cfg.ratio(i)
        if m:
            total += (entry + (key if cfg.is_csa(i) else 0)) / m
    return total


def kv_bytes_per_sequence(cfg: ModelConfig, dtype_bytes: int, mtp_layers: int) -> int:
    """Per-sequence bytes that do not grow with its length (as `engine.kv_layout.sequence_constant_bytes`)."""
    total = 0
    for i in range(cfg.num_hidden_layers + mtp_layers):
        total += cfg.sliding_window * cfg.head_dim * dtype_bytes
        m = cfg.ratio(i)
        if m:
            coff = 2 if cfg.is_csa(i) else 1
            total += 2 * coff * m * coff * cfg.head_dim * 4
            if cfg.is_csa(i):
                total += 2 * 2 * m * 2 * cfg.index_head_dim * 4
    return total


def rank_weights(
    cfg: ModelConfig,
    layout: Layout,
    rank: int,
    formats: dict[str, str] | None = None,
    float_bytes: int = 2,
) -> dict[str, int]:
    """Bytes of the weights rank `rank` holds, by class; `formats` (name -> format) defaults to the released
    formats (FP8 / MXFP4 when the config has a quantization_config, else BF16). BF16/F16 tensors are held in the
    compute dtype (`float_bytes` per element), as the loader holds them."""
    quantized = cfg.quantization_config is not None
    out = {"fp8": 0, "mxfp4": 0, "bf16": 0, "other": 0}
    for spec in checkpoint_schema(cfg):
        fmt = formats[spec.name] if formats is not None else released_format(spec.kind, quantized)
        piece = place(spec, fmt, cfg, layout, rank)
        if piece is not None:
            shape = piece.shape(spec.shape)
            held = math.prod(shape) * float_bytes if fmt in ("bf16", "f16") else stored_bytes(fmt, shape)
            out[weight_class(fmt)] += held
    return out


def activation_bytes(cfg: ModelConfig, layout: Layout, dtype_bytes: int, tokens: int, seqs: int, context: int) -> int:
    """Estimated largest live activations of one step of `tokens` tokens (one layer at a time)."""
    a, d, tp = dtype_bytes, cfg.hidden_size, layout.tp
    heads = cfg.num_attention_heads // tp
    inter = cfg.moe_intermediate_size // (tp if layout.ep == 1 else 1)
    per_token = (
        2 * cfg.hc_mult * d * a  # residual streams in and out
        + (d + cfg.q_lora_rank + 2 * heads * cfg.head_dim + cfg.head_dim) * a  # x, q_lora, q and o, K=V
        + (cfg.index_n_heads * cfg.index_head_dim) * a  # indexer queries
        + cfg.num_experts_per_tok * (3 * inter * a + d * 4)  # routed rows: w13 out, SwiGLU, w2 out (fp32)
        + d * 4  # the MoE's fp32 sum
    )
    csa = any(cfg.ratio(i) == CSA_RATIO for i in range(cfg.num_hidden_layers))
    indexer_scores = tokens * (context // CSA_RATIO) * 4 if csa else 0
    logits = 2 * seqs * cfg.vocab_size * 4  # this rank's vocabulary and the gathered rows, fp32
    return tokens * per_token + indexer_scores + logits


def plan(
    cfg: ModelConfig,
    accelerator: str,
    devices_per_pod: int,
    pods: int = 1,
    tensor: int | None = None,
    data: int = 1,
    expert: bool = True,
    dtype: str = "bfloat16",
    context: int = CONTEXT,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    max_seqs: int = MAX_SEQS,
    kv_fraction: float = KV_FRACTION,
    model: str = "model",
) -> Plan:
    """Whether `cfg` fits `pods` x `devices_per_pod` devices of `accelerator` with `tensor` x `data` ranks
    (tensor defaults to all devices / data), experts split over all ranks when `expert`."""
    if accelerator not in ACCELERATORS:
        raise PlanError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown activation dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    if not 0 < kv_fraction <= 1:
        raise PlanError(f"kv fraction {kv_fraction} must be in (0, 1]")
    acc = ACCELERATORS[accelerator]
    world = devices_per_pod * pods
    tp = tensor if tensor is not None else world // data
    if tp * data != world:
        raise PlanError(
            f"tensor {tp} x data {data} = {tp * data} ranks, but {pods} pod(s) x {devices_per_pod} devices = {world}"
        )
    layout = Layout(world=world, tp=tp, ep=world if expert else 1)
    notes: list[str] = []
    if layout.dp > 1:
        notes.append(
            f"data-parallel attention: {layout.dp} groups of {tp} ranks, each holding its own sequences' KV (the "
            "capacity below is one group's; the worker holds that many times it)"
        )
    layout.check(cfg)
    ranks = sorted({0, world - 1})
    a = DTYPE_BYTES[dtype]
    per_rank = {r: rank_weights(cfg, layout, r, float_bytes=a) for r in ranks}
    largest = max(ranks, key=lambda r: sum(per_rank[r].values()))
    weights = per_rank[largest]
    total_w = sum(weights.values())
    all_ranks = sum(
        stored_bytes(released_format(s.kind, cfg.quantization_config is not None), s.shape)
        for s in checkpoint_schema(cfg)
    )
    act = activation_bytes(cfg, layout, a, max_batch_tokens, max_seqs, context)
    bpt = kv_bytes_per_token(cfg, a)
    per_seq = kv_bytes_per_sequence(cfg, a, cfg.num_nextn_predict_layers)
    after_load = acc.memory_bytes - acc.overhead_bytes - total_w
    pool = max(0, min(int(kv_fraction * after_load), after_load - act))
    one_seq = math.ceil(context * bpt) + per_seq
    tokens = int(pool // bpt) if bpt else 0
    seqs = pool // one_seq
    need = acc.overhead_bytes + total_w + act + one_seq
    fits = need <= acc.memory_bytes and seqs >= 1
    shortfall = max(0, need - acc.memory_bytes)
    if fits:
        message = (
            f"fits: {tokens:,} KV tokens per rank ({seqs:,} sequences of {context:,} tokens"
            + (f" per group, {seqs * layout.dp:,} in all" if layout.dp > 1 else "")
            + ")"
        )
    else:
        message = (
            f"does not fit: each rank needs {need / GiB:.1f} GiB (weights {total_w / GiB:.1f}, runtime reserve "
            f"{acc.overhead_bytes / GiB:.1f}, activations {act / GiB:.1f}, one {context:,}-token sequence "
            f"{one_seq / GiB:.2f}) but one {acc.description} has {acc.memory_bytes / GiB:.1f} GiB: short by "
            f"{shortfall / GiB:.1f} GiB"
        )
    return Plan(
        model=model,
        accelerator=acc.name,
        devices_per_pod=devices_per_pod,
        pods=pods,
        layout=layout.describe(),
        world=world,
        dtype=dtype,
        largest_rank=largest,
        weights=weights,
        weights_total=total_w,
        weights_all_ranks=all_ranks,
        device_memory=acc.memory_bytes,
        overhead=acc.overhead_bytes,
        activations=act,
        kv_bytes_per_token=bpt,
        kv_bytes_per_sequence=per_seq,
        context=context,
        kv_pool=pool,
        kv_tokens=tokens,
        sequences=seqs,
        fits=fits,
        shortfall=shortfall,
        message=message,
        notes=notes,
    )


def render(p: Plan) -> str:
    """The human report of a plan."""

    def gib(n: float) -> str:
        return f"{n / GiB:.1f} GiB"

    w = p.weights
    lines = [
        f"{p.model} on {p.pods} pod(s) x {p.devices_per_pod} {ACCELERATORS[p.accelerator].description}, layout "
        f"{p.layout}, {p.dtype} activations",
        f"weights      {gib(p.weights_all_ranks)} in all; rank {p.largest_rank} (the largest) holds "
        f"{gib(p.weights_total)}: FP8 {gib(w['fp8'])}, MXFP4 {gib(w['mxfp4'])}, BF16 {gib(w['bf16'])}, "
        f"F32/int {gib(w['other'])}",
        f"reserve      runtime {gib(p.overhead)} + activations {gib(p.activations)} (estimates)",
        f"device       {gib(p.device_memory)}; KV pool {gib(p.kv_pool)}",
        f"KV cache     {p.kv_bytes_per_token:,.1f} B per token + {p.kv_bytes_per_sequence / MiB:.1f} MiB per sequence",
        p.message,
        *[f"note: {n}" for n in p.notes],
    ]
    return "\n".join(lines)


def main_args(args: Any) -> int:
    """`dsv4 plan`: print the plan (text, or JSON with --json); exit 1 when the layout does not fit, 2 on bad
    input."""
    import sys

    from dsv4.model_runtime.config import ConfigError
    from dsv4.model_runtime.presets import published_config

    try:
        if args.preset:
            cfg = ModelConfig.from_dict(published_config(args.preset))
            name = f"DeepSeek-V4-{args.preset.capitalize()}"
        else:
            cfg = ModelConfig.from_file(args.config)
            name = str(args.config)
        p = plan(
            cfg,
            args.accelerator,
            args.devices_per_pod,
            args.pods,
            args.tensor,
            args.data,
            not args.no_expert_parallel,
            args.dtype,
            args.context,
            args.max_batch_tokens,
            args.max_seqs,
            args.kv_fraction,
            model=name,
        )
    except (ConfigError, PlanError, PlacementError) as e:
        print(f"dsv4 plan: {e}", file=sys.stderr)
        return 2
    print(p.to_json() if args.json else render(p))
    return 0 if p.fits else 1
