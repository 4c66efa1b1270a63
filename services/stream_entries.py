"""How values are spelled inside Redis stream entries, shared by the work queues and the token streams."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

from dsv4.model_runtime.engine.port import TokenLogprobs


class MalformedEntry(ValueError):
    """A stream entry that does not follow this protocol."""


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 (4 bytes a token; JSON would be 2-3x larger for long prompts)."""
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(data: bytes) -> tuple[int, ...]:
    """Inverse of `pack_ids`; raises ValueError on a length that is not a multiple of 4."""
    if len(data) % 4:
        raise ValueError(f"packed token ids have {len(data)} bytes, not a multiple of 4")
    return struct.unpack(f"<{len(data) // 4}I", data)


def pack_logprobs(logprobs: Sequence[TokenLogprobs]) -> bytes:
    """Logprobs of consecutive tokens as JSON: [[logprob, [[id, logprob], …]], …] (small next to the text)."""
    return json.dumps([[lp.logprob, [list(t) for t in lp.top]] for lp in logprobs], separators=(",", ":")).encode()


def unpack_logprobs(data: bytes, count: int) -> tuple[TokenLogprobs, ...]:
    """Inverse of `pack_logprobs`; raises MalformedEntry unless it holds exactly `count` well-formed entries."""
    try:
        raw = json.loads(data)
        out = tuple(TokenLogprobs(float(lp), tuple((int(i), float(v)) for i, v in top)) for lp, top in raw)
    except (ValueError, TypeError) as e:
        raise MalformedEntry(f"unreadable token logprobs: {e}") from e
    if len(out) != count:
        raise MalformedEntry(f"{len(out)} token logprobs for {count} tokens")
    return out


def as_text(raw: bytes | str) -> str:
    """A stream entry id (or name) as text (redis-py returns bytes unless the client decodes responses)."""
    return raw.decode() if isinstance(raw, bytes) else raw
