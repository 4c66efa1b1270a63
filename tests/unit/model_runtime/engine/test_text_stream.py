"""Stop strings cut streamed text at the earliest match, whatever the delta or token boundaries (one implementation,
used by the engine and by the gateway)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.model_runtime.engine.text_stream import StopMatcher, TextStream
from dsv4.model_runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

ALPHABET = "ab\n"


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
    if not hits:
        return text, False
    return text[: min(hits)[0]], True


@given(
    st.text(ALPHABET, max_size=40),
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 5), max_size=40),
)
def test_any_split_gives_text_before_the_earliest_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    m = StopMatcher(stops)
    out, pos = "", 0
    for c in cuts:
        out += m.feed(text[pos : pos + c])
        pos += c
    out += m.feed(text[pos:], final=True)
    assert (out, m.stopped) == expected(text, stops)


def test_partial_stop_is_held_back_then_released() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.feed("N") == ""
    assert m.feed("D!") == "" and m.stopped
    m2 = StopMatcher(["END"])
    assert m2.feed("hello EN") == "hello "
    assert m2.feed("X") == "ENX" and not m2.stopped


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained()  # the bundled official tokenizer: no checkpoint needed


WORDS = ["Hello", " world", "!", " END", "E", "N", "D", " 深度", "求索", " 🤖", "\n"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=12), st.lists(st.integers(1, 4), max_size=12))
def test_token_deltas_concatenate_to_the_decoded_text_cut_at_the_stop(
    tokenizer: Tokenizer, words: list[str], batches: list[int]
) -> None:
    ids = tokenizer.encode("".join(words))
    stream = TextStream(tokenizer, ["END"], skip_special_tokens=False)
    out, pos = "", 0
    for n in [*batches, len(ids)]:
        stream.add_many(ids[pos : pos + n])
        out += stream.delta()
        pos += n
    stream.finish()
    out += stream.delta(final=True)
    want, stopped = expected(tokenizer.decode(ids), ["END"])
    assert (out, stream.text, stream.stopped) == (want, want, stopped)
