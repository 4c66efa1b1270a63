"""Handoff descriptor parsing, without Redis."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dsv4.protocol.config import MAX_CHUNK_BYTES
from dsv4.services.handoff import Descriptor, HandoffCorrupt

pytestmark = pytest.mark.unit


def _desc(**over: object) -> Descriptor:
    fields: dict = dict(  # type: ignore[type-arg]
        handoff_id="r.1",
        request_id="r",
        kv_format_version=1,
        model_fingerprint="fp",
        total_bytes=5,
        num_tokens=3,
        chunk_sizes=(4, 1),
        first_token=7,
        transport="redis",
        lease_deadline_ms=1,
    )
    fields.update(over)
    return Descriptor(**fields)


def test_descriptor_json_round_trip() -> None:
    d = _desc(trace_context={"traceparent": "00-x"})
    assert Descriptor.from_json(d.to_json()) == d


@pytest.mark.parametrize(
    "bad",
    [
        _desc(total_bytes=6),
        _desc(chunk_sizes=(0, 5)),
        _desc(total_bytes=MAX_CHUNK_BYTES + 1, chunk_sizes=(MAX_CHUNK_BYTES + 1,)),
        _desc(transport="carrier-pigeon"),
        _desc(transport="direct"),
        _desc(format_version=99),
    ],
)
def test_inconsistent_descriptor_is_corrupt(bad: Descriptor) -> None:
    with pytest.raises(HandoffCorrupt):
        Descriptor.from_json(bad.to_json())


@given(st.binary(max_size=200))
@example(b"1")
@example(b"[]")
@example(b'{"format_version": 1}')
def test_garbage_descriptor_is_corrupt_never_another_error(raw: bytes) -> None:
    with pytest.raises(HandoffCorrupt):
        Descriptor.from_json(raw)
