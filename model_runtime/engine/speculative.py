"""MTP speculative decoding with the checkpoint's `mtp.0` module: one draft token per decode step, verified.

The MTP module follows each sequence one position behind the main model: for every position t it consumes the
main model's streams at t and the token at t+1, and its logits at the newest position give the draft for the
token after the last sampled one. A decode step then feeds [last token, draft] to the main model. Verification
draws the target token exactly as plain decoding would (same logits row, same (seed, index) uniform), so the
output is identical with and without MTP: the draft is accepted iff it equals that token, and then the second
logits row yields one more token for free. On a rejection the state is rolled back to before the step and the
last token is fed again alone, which leaves it as plain decoding would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsv4.model_runtime.state import SequenceState


@dataclass
class LayerSnapshot:
    window_rows: dict[int, torch.Tensor]
    comp: dict[str, torch.Tensor]
    n_entries: int


@dataclass
class StepSnapshot:
    """What a step of `n` tokens from `position` can change in a sequence's state (main decoder layers)."""

    position: int
    layers: list[LayerSnapshot] = field(default_factory=list)


_COMP = ("comp_kv", "comp_score", "icomp_kv", "icomp_score")


def snapshot(state: SequenceState, n: int, window: int) -> StepSnapshot:
    """Save the window slots the next `n` positions overwrite, the compressor state and the entry count."""
    slots = {(state.position + k) % window for k in range(n)}
    snap = StepSnapshot(state.position)
    for ls in state.layers:
        snap.layers.append(
            LayerSnapshot(
                window_rows={s: ls.window[s].clone() for s in slots},
                comp={name: getattr(ls, name).clone() for name in _COMP if getattr(ls, name).numel()},
                n_entries=ls.n_entries,
            )
        )
    return snap


def rollback(state: SequenceState, snap: StepSnapshot) -> None:
    """Undo a step: the state is again exactly as `snapshot` saw it."""
    for ls, saved in zip(state.layers, snap.layers, strict=True):
        for slot, row in saved.window_rows.items():
            ls.window[slot] = row
        for name, t in saved.comp.items():
            setattr(ls, name, t)
        ls.n_entries = saved.n_entries
    state.position = snap.position


@dataclass
class DraftStats:
    """Speculative decoding counters: drafts proposed to the main model and drafts it accepted."""

    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0
