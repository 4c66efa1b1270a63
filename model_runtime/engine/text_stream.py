"""Detokenized text of one request as it streams: whole-character deltas, stop strings cut exactly.

Text that could still turn into a stop string is held back, so the deltas handed out always concatenate to the
final text (which ends right before the earliest stop string). The engine (`LLMEngine`) and the gateway (which
applies the request's stop strings to the token stream the workers send) both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dsv4.model_runtime.dsml import find_stop, held_back
from dsv4.model_runtime.tokenizer import Tokenizer


class StopMatcher:
    """Streams text up to the earliest stop string, holding back tails that may still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add text; returns what can be sent now. After a stop string was seen, `stopped` is True."""
        if self.stopped:
            return ""
        self._text += delta
        if self.stops:
            hit = find_stop(self._text, self._sent, self.stops, final)
            if hit is not None:
                out = self._text[self._sent : hit[0]]
                self._sent = len(self._text)
                self.stopped = True
                return out
        end = len(self._text) if final else len(self._text) - held_back(self._text, self._sent, self.stops)
        out = self._text[self._sent : end]
        self._sent = end
        return out


class TextStream:
    """Feeds token ids through the tokenizer's incremental detokenizer and applies stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], skip_special_tokens: bool) -> None:
        self._detok = tokenizer.detokenizer(skip_special_tokens=skip_special_tokens)
        self._matcher = StopMatcher(stop)
        self.text = ""  # everything released so far; the final text once finished
        self._sent = 0

    @property
    def stopped(self) -> bool:
        """A stop string was found; the text ends right before it and nothing more is added."""
        return self._matcher.stopped

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` once the text contains a stop string (and cuts it there)."""
        self.add_many((token_id,))

    def add_many(self, token_ids: Iterable[int]) -> None:
        """Append several generated tokens (one stop-string check for all of them)."""
        if not self.stopped:
            self.text += self._matcher.feed(self._detok.add_many(token_ids))

    def finish(self) -> None:
        """End of generation: flush bytes of an unfinished character (as `Tokenizer.decode` writes them) and the
        text held back for stop strings that can no longer complete."""
        if not self.stopped:
            self.text += self._matcher.feed(self._detok.finish(), final=True)

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet; with `final`, also what was held back for stop strings."""
        if final and not self.stopped:
            self.text += self._matcher.feed("", final=True)
        out = self.text[self._sent :]
        self._sent = len(self.text)
        return out
