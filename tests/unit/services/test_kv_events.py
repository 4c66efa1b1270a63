"""KV events: the wire format, and the index the gateway builds from them."""

from __future__ import annotations

import pytest

from dsv4.model_runtime.engine.prefix_hash import chain_hashes, chain_seed
from dsv4.services.kv_events import KVEvent, PrefixIndex, WorkerLoad

pytestmark = pytest.mark.unit

H = [f"{i:032x}" for i in range(6)]


def test_events_survive_the_wire_and_bad_ones_are_refused() -> None:
    ev = KVEvent("w1", "snapshot", (H[0], H[1]), 16, WorkerLoad(3, 1), model="fp")
    assert KVEvent.from_fields(ev.to_fields()) == ev
    assert KVEvent.from_fields(KVEvent("w1", "stored", (H[2],), 16).to_fields()).load is None
    fields = ev.to_fields()
    for broken in (
        {**fields, b"op": b"grow"},
        {**fields, b"h": b"abc"},
        {k: v for k, v in fields.items() if k != b"w"},
    ):
        with pytest.raises(ValueError, match="malformed KV event"):
            KVEvent.from_fields(broken)


def test_the_index_follows_stored_evicted_and_snapshots() -> None:
    index = PrefixIndex(forget_after_s=10)
    index.apply(KVEvent("a", "stored", (H[0], H[1], H[2]), 16), now=0)
    index.apply(KVEvent("b", "stored", (H[0],), 16), now=0)
    prompt = [H[0], H[1], H[2], H[3]]
    assert index.matched_blocks(prompt, now=1) == {"a": 3, "b": 1}
    index.apply(KVEvent("a", "evicted", (H[2],), 16), now=1)
    assert index.matched_blocks(prompt, now=1) == {"a": 2, "b": 1}
    index.apply(KVEvent("b", "snapshot", (H[3],), 16, WorkerLoad(5, 0)), now=2)  # replaces what b held
    assert index.matched_blocks(prompt, now=2) == {"a": 2, "b": 4}
    assert index.workers(now=2)["b"] == WorkerLoad(5, 0)


def test_a_worker_that_goes_quiet_is_forgotten() -> None:
    index = PrefixIndex(forget_after_s=10)
    index.apply(KVEvent("a", "stored", (H[0],), 16), now=0)
    index.apply(KVEvent("b", "stored", (H[0],), 16), now=5)
    assert set(index.workers(now=12)) == {"b"}
    assert index.matched_blocks([H[0]], now=12) == {"b": 1}


def test_matched_tokens_hash_the_prompt_as_each_worker_does_and_count_predictions() -> None:
    """Workers name their model and block size; the router's predictions count until their events take over."""
    prompt = list(range(100, 140))
    a_hashes = chain_hashes(chain_seed("fp", 8), prompt, 8)
    index = PrefixIndex(forget_after_s=10)
    index.apply(KVEvent("a", "snapshot", (a_hashes[1],), 8, WorkerLoad(), model="fp"), now=0)
    index.apply(KVEvent("b", "snapshot", (), 8, WorkerLoad(), model="fp"), now=0)
    index.apply(KVEvent("c", "snapshot", (a_hashes[3],), 8, WorkerLoad(), model="other-model"), now=0)
    assert index.matched_tokens(prompt, now=1) == {"a": 16, "b": 0, "c": 0}
    index.predict("b", index.prompt_hashes("b", prompt), ttl_s=5, now=1)
    assert index.matched_tokens(prompt, now=2)["b"] == 40
    assert index.matched_tokens(prompt, now=7)["b"] == 0, "a prediction expires"
    index.predict("b", a_hashes[:2], ttl_s=5, now=7)
    index.apply(KVEvent("b", "evicted", (a_hashes[1],), 8, model="fp"), now=8)
    assert index.matched_tokens(prompt, now=8)["b"] == 8, "an eviction overrides a prediction"
    index.predict("gone", a_hashes, now=8)  # a worker the index does not know is ignored
    assert "gone" not in index.matched_tokens(prompt, now=8)
