"""Detokenized text of one request as it streams: whole-character deltas, stop strings cut exactly.

Text that could still turn into a stop string is held back, so the deltas handed out always concatenate to the
final text (which ends right before the earliest stop string).
"""

from __future__ import annotations

from collections.abc import Sequence

from dsv4.model_runtime.tokenizer import Tokenizer


class TextStream:
    """Feeds token ids through the tokenizer's incremental detokenizer and applies stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], skip_special_tokens: bool) -> None:
        self._detok = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` once the text contains a stop string (and cuts it there)."""
        if self.stopped:
            return
        before = len(self.text)
        self.text += self._detok.add(token_id)
        self._cut_at_stop(before)

    def finish(self) -> None:
        """End of generation: flush bytes of an unfinished character (as `Tokenizer.decode` writes them)."""
        if not self.stopped:
            before = len(self.text)
            self.text += self._detok.finish()
            self._cut_at_stop(before)

    def delta(self, final: bool) -> str:
        """The text not handed out yet; unless `final`, minus a tail that may still become a stop string."""
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out

    def _cut_at_stop(self, before: int) -> None:
        if not self._stop:
            return
        # A stop string completed by the new text starts at most len(stop) - 1 characters before it.
        start = max(0, before - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
