"""MTP speculative decoding with the checkpoint's `mtp.0` module: one draft token per decode step, verified.

The MTP module follows each sequence one position behind the main model: for every position t it consumes the
main model's streams at t and the token at t+1, and its logits at the newest position give the draft for the
token after the last sampled one. A verification step (`ModelRunner._verify`) feeds [last token, draft] to the
main model over the paged pool, the two tokens of a row in order. Verification draws the target token exactly as
plain decoding would (same logits row, same (seed, index) draw), so the output is identical with and without MTP:
the draft is accepted iff it equals that token, and then the second logits row yields one more token for free.
On a rejection the draft's pool writes are taken back on the device (`state.PagedUndo`), which leaves the state
as plain decoding of the last token would have: nothing is fed again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftStats:
    """Speculative decoding counters: drafts proposed to the main model and drafts it accepted."""

    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0
