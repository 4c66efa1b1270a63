"""Kubernetes memory quantities as bytes and back: the operator adds /dev/shm to a container's memory request."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(e[0-9]+|[kMGTPE]i?|Ki)?$")


class QuantityError(ValueError):
    """A memory quantity the operator cannot read."""


def to_bytes(quantity: str | int) -> int:
    """Bytes of a memory quantity such as `256Gi`, `1.5G`, `512Mi` or `1048576` (rounded up)."""
    text = str(quantity).strip()
    m = _QUANTITY.match(text)
    if m is None:
        raise QuantityError(f"not a memory quantity: {quantity!r} (expected e.g. 512Mi, 16Gi, 1.5G)")
    number, suffix = float(m.group(1)), m.group(2) or ""
    factor = 10 ** int(suffix[1:]) if suffix.startswith("e") else _SUFFIX[suffix]
    return int(-(-number * factor // 1))


def from_bytes(n: int) -> str:
    """The shortest exact binary spelling of `n` bytes (`16Gi`, `1536Mi`, `100`)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if n and n % _SUFFIX[suffix] == 0:
            return f"{n // _SUFFIX[suffix]}{suffix}"
    return str(n)
