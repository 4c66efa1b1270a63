"""Queue entry encoding: jobs survive the round trip, malformed entries are named, never half-parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.services.stream_entries import MalformedEntry, pack_ids, unpack_ids
from dsv4.services.work_queue import Job

pytestmark = pytest.mark.unit


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=2000))
def test_token_ids_pack_round_trip(ids: list[int]) -> None:
    assert unpack_ids(pack_ids(ids)) == tuple(ids)


def test_job_round_trip_keeps_every_field() -> None:
    job = Job(
        request_id="r1",
        prompt_ids=(0, 128803, 5, 128804),
        sampling=SamplingSpec(max_tokens=7, temperature=0.5, seed=3, stop_token_ids=(1, 2)),
        handoff_key="dsv4:{d}:kv:r1:desc",
        trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v"},
        enqueued_at_ms=1234,
    )
    assert Job.from_fields(job.to_fields()) == job


def test_job_without_handoff_or_trace() -> None:
    job = Job("r2", (1,), SamplingSpec(max_tokens=1))
    back = Job.from_fields(job.to_fields())
    assert back.handoff_key is None and dict(back.trace_context) == {}
    assert back.enqueued_at_ms > 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop(b"rid"),
        lambda f: f.__setitem__(b"v", b"9"),
        lambda f: f.__setitem__(b"prompt", b"abc"),
        lambda f: f.__setitem__(b"sampling", b"{not json"),
        lambda f: f.__setitem__(b"sampling", b'{"max_tokens": 1, "bogus": 2}'),
    ],
)
def test_malformed_job_raises_malformed_entry(mutate) -> None:  # type: ignore[no-untyped-def]
    fields = Job("r", (1, 2), SamplingSpec(max_tokens=1)).to_fields()
    mutate(fields)
    with pytest.raises(MalformedEntry):
        Job.from_fields(fields)
