"""MTP speculative decoding with the checkpoint's `mtp.0` module: one draft token per decode step, verified.

The MTP module follows each sequence one position behind the main model: for every position t it consumes the
main model's streams at t and the token at t+1, and its logits at the newest position give the draft for the
token after the last sampled one. A verification step (`start_verification`, `end_verification`; driven by
`ModelRunner._verify`) feeds [last token, draft] to the main model over the paged pool, the two tokens of a row in
order. It draws the target token exactly as plain decoding would (same logits row, same (seed, index) draw), so the
output is identical with and without MTP: the draft is accepted iff it equals that token, and then the second
logits row yields one more token for free. On a rejection the draft's pool writes are taken back on the device
(`state.PagedUndo`), which leaves the state as plain decoding of the last token would have: nothing is fed again.
Both parts are fixed sequences of device ops, so each is captured in a graph like the decode step
(`cuda_graphs.DecodeGraphs.run_verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv4.model_runtime.engine.kv_state import KVPool
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import PagedDecode


@dataclass
class DraftStats:
    """Speculative decoding counters: drafts proposed to the main model and drafts it accepted."""

    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass(frozen=True)
class VerifyStep:
    """A verification step after its model call: the logits [B, 2, vocab] of each row's last token and draft, the
    drafts [B] it verifies (device), and `finish`, which takes the step's draws [B, 2] (device) and returns the next
    drafts [B] (device)."""

    logits: torch.Tensor
    drafts: torch.Tensor
    finish: Callable[[torch.Tensor], torch.Tensor]


def start_verification(model: DeepseekV4, inputs: DecodeInputs, pool: KVPool) -> VerifyStep:
    """The model call of the verification step of `inputs` (rows with their drafts) over `pool`: the two tokens
    of every row fed in order, what the drafts overwrite saved in the step's undo log."""
    hidden, finish = verification_hidden(model, inputs, pool)
    return VerifyStep(model.head_logits(hidden), inputs.drafts, finish)


def verification_hidden(
    model: DeepseekV4, inputs: DecodeInputs, pool: KVPool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """`start_verification` up to the head (what a verification graph captures): the head's inputs [B, 2, d] and
    the step's end, `VerifyStep.finish`."""
    step = inputs.step(pool)
    streams = model.paged_streams(inputs.verify_ids, step)
    drafts = inputs.drafts

    def finish(tokens: torch.Tensor) -> torch.Tensor:
        return end_verification(model, step, streams, drafts, tokens)

    return model.final_hidden(streams), finish


def end_verification(
    model: DeepseekV4, step: PagedDecode, streams: torch.Tensor, drafts: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The end of a verification step whose draws are `tokens` [B, 2]: the MTP over the step's two positions
    (main streams [B, 2, n, d], each with the token drawn after it), then the pool writes of the `drafts` [B] that
    were rejected (the first draw differs) taken back, the MTP's included. Returns the next drafts [B]: the MTP's
    guess after the second token where the draft was accepted, after the first elsewhere. No host sync."""
    rejected = tokens[:, 0] != drafts
    guesses = torch.argmax(model.mtp_paged(streams, tokens, step), dim=-1)  # [B, 2]
    assert step.undo is not None, "a verification step keeps an undo log"
    step.undo.restore(rejected)
    return torch.where(rejected, guesses[:, 0], guesses[:, 1])
