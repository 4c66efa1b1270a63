"""Which part of every checkpoint tensor each rank of a parallel layout holds (torch-free: the loader reads
exactly these pieces, and `dsv4 plan` counts them).

A layout splits `world` ranks into `dp` groups of `tp` ranks (rank r is tensor rank r % tp of group r // tp):

- tensor parallel (tp): the vocabulary rows of `embed` and `head`; the heads of attention (`wq_b` rows,
  `attn_sink`, the `wo_a` rows of their output groups, the `wo_b` columns); the shared expert's intermediate
  dimension (`w1`/`w3` rows, `w2` columns) when that splits into whole FP8 blocks (else tensor rank 0 holds
  it whole); and, without expert parallelism, the routed experts' intermediate dimension the same way. K=V,
  the compressors, the indexer, norms, router and mHC tensors are replicated: they feed the K=V cache, which
  every rank holds whole.
- expert parallel (ep = world): rank r holds routed experts [r*E/world, (r+1)*E/world) whole. The shared expert
  is then held by the ranks of group 0 only, so that the MoE's sum over the world counts it once.
- data parallel attention (dp = world / tp > 1): the groups hold the same attention and dense pieces.

A split that cuts through a block of a blocked format is refused (`PlacementError` names the tensor and the rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.schema import TensorSpec
from dsv4.model_runtime.storage import FP4_BLOCK, FP8_BLOCK

_ROWS_BY_TP = re.compile(
    r"^(embed\.weight|head\.weight|(layers|mtp)\.\d+\.attn\.(wq_b\.weight|attn_sink|wo_a\.weight))$"
)
_COLS_BY_TP = re.compile(r"^(layers|mtp)\.\d+\.attn\.wo_b\.weight$")
_SHARED = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.shared_experts\.(w1|w2|w3)\.weight$")
_EXPERT = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


class PlacementError(ValueError):
    """A layout that cannot split this model or this checkpoint; the message names the tensor or key and the rule."""


@dataclass(frozen=True)
class Layout:
    """world ranks = dp groups x tp ranks; ep is 1 (experts follow tp) or world (experts split by index)."""

    world: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or self.tp < 1 or self.world % self.tp:
            raise PlacementError(f"tensor parallel {self.tp} must divide the world size {self.world}")
        if self.ep not in (1, self.world):
            raise PlacementError(f"expert parallel {self.ep} must be 1 or the world size {self.world}")

    @classmethod
    def from_parallelism(cls, tensor: int, data: int, expert: bool) -> Layout:
        """The layout of a worker's `parallelism` settings (tensor x data ranks, experts split over all of them)."""
        world = tensor * data
        return cls(world=world, tp=tensor, ep=world if expert else 1)

    @property
    def dp(self) -> int:
        return self.world // self.tp

    def describe(self) -> str:
        parts = [f"TP{self.tp}"] + ([f"DP{self.dp}"] if self.dp > 1 else []) + ([f"EP{self.ep}"] if self.ep > 1 else [])
        return "x".join(parts) + f" ({self.world} ranks)"

    def check(self, cfg: ModelConfig) -> None:
        """Raise PlacementError unless every split of this layout divides the model's dimensions evenly."""
        rules = [
            ("vocab_size", cfg.vocab_size, self.tp, "tensor parallel (vocabulary rows of embed and head)"),
            ("num_attention_heads", cfg.num_attention_heads, self.tp, "tensor parallel (attention heads)"),
            ("o_groups", cfg.o_groups, self.tp, "tensor parallel (output groups of wo_a)"),
        ]
        if self.ep > 1:
            rules.append(("n_routed_experts", cfg.n_routed_experts, self.ep, "expert parallel"))
        else:
            rules.append(("moe_intermediate_size", cfg.moe_intermediate_size, self.tp, "tensor parallel (experts)"))
        for key, value, parts, what in rules:
            if value % parts:
                raise PlacementError(
                    f"layout {self.describe()}: {what} splits '{key}' ({value}) over {parts} ranks, "
                    f"which does not divide it"
                )

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def experts(self, cfg: ModelConfig, rank: int) -> range:
        """The routed experts rank `rank` holds (all of them unless expert parallel)."""
        if self.ep == 1:
            return range(cfg.n_routed_experts)
        share = cfg.n_routed_experts // self.ep
        return range(rank * share, (rank + 1) * share)


@dataclass(frozen=True)
class Piece:
    """The part of one tensor a rank holds: all of it (axis None), or [start, stop) along `axis`."""

    axis: int | None = None
    start: int = 0
    stop: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        """The held part's logical shape."""
        if self.axis is None:
            return full
        return tuple(self.stop - self.start if i == self.axis else n for i, n in enumerate(full))


WHOLE = Piece()


def _split(spec: TensorSpec, axis: int, parts: int, index: int, fmt: str) -> Piece:
    size = spec.shape[axis]
    share = size // parts
    if share * parts != size:
        raise PlacementError(f"tensor {spec.name!r}: {parts}-way split of its {size} {_axis(axis)} is not even")
    piece = Piece(axis, index * share, (index + 1) * share)
    block = {"fp8": FP8_BLOCK, "fp4": FP4_BLOCK if axis == 1 else 1}.get(fmt, 1)
    if share % block:
        rule = "FP8 weights are scaled per 128x128 block" if fmt == "fp8" else "MXFP4 scales cover 32 columns"
        raise PlacementError(
            f"tensor {spec.name!r} (stored {fmt.upper()}): a {parts}-way split gives each rank {share} "
            f"{_axis(axis)}, not a multiple of {block}; {rule}, and a split may not cut through a block"
        )
    return piece


def _axis(axis: int) -> str:
    return "rows" if axis == 0 else "columns"


def place(spec: TensorSpec, fmt: str, cfg: ModelConfig, layout: Layout, rank: int) -> Piece | None:
    """What rank `rank` holds of tensor `spec` stored in format `fmt`: a Piece, or None for nothing."""
    tp, t = layout.tp, layout.tp_rank(rank)
    expert = _EXPERT.match(spec.name)
    if expert:
        if layout.ep > 1:
            return WHOLE if int(expert.group(1)) in layout.experts(cfg, rank) else None
        return _split(spec, 1 if expert.group(2) == "w2" else 0, tp, t, fmt) if tp > 1 else WHOLE
    shared = _SHARED.match(spec.name)
    if shared:
        if not holds_shared_expert(cfg, fmt, layout, rank):
            return None
        return (
            _split(spec, 1 if shared.group(1) == "w2" else 0, tp, t, fmt)
            if splits_shared_expert(cfg, fmt, layout)
            else WHOLE
        )
    if tp == 1:
        return WHOLE
    if _ROWS_BY_TP.match(spec.name):
        return _split(spec, 0, tp, t, fmt)
    if _COLS_BY_TP.match(spec.name):
        return _split(spec, 1, tp, t, fmt)
    return WHOLE


def splits_shared_expert(cfg: ModelConfig, fmt: str, layout: Layout) -> bool:
    """Whether the shared expert (stored in `fmt`) is split over the tensor ranks: when its intermediate rows
    divide into whole blocks of the format; otherwise tensor rank 0 holds it whole (small models at tp > 1)."""
    if layout.tp == 1 or cfg.moe_intermediate_size % layout.tp:
        return False
    return (cfg.moe_intermediate_size // layout.tp) % (FP8_BLOCK if fmt == "fp8" else 1) == 0


def holds_shared_expert(cfg: ModelConfig, fmt: str, layout: Layout, rank: int) -> bool:
    """Whether rank `rank` holds (a part of) the shared expert; the MoE's sum over the ranks must count it once."""
    if layout.ep > 1 and layout.dp_rank(rank) > 0:
        return False
    return splits_shared_expert(cfg, fmt, layout) or layout.tp_rank(rank) == 0


def expert_of(name: str) -> tuple[int, str] | None:
    """(expert index, "w1"/"w2"/"w3") of a routed expert's weight name, else None."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
