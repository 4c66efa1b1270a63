"""KV events: the wire format, and the index the gateway builds from them."""

from __future__ import annotations

import pytest

from dsv4.services.kv_events import KVEvent, PrefixIndex, WorkerLoad

pytestmark = pytest.mark.unit

H = [f"{i:032x}" for i in range(6)]


def test_events_survive_the_wire_and_bad_ones_are_refused() -> None:
    ev = KVEvent("w1", "snapshot", (H[0], H[1]), 16, WorkerLoad(3, 1))
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
