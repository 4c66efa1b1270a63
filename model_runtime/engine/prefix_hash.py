"""Chained hashes of token blocks: the keys of the prefix cache, in the engine, in the Redis tier and in the gateway's
router (which must all compute the same ones).

For a block size B and a seed that names the model, `h_0 = H(seed || tokens[0:B])` and
`h_i = H(h_{i-1} || tokens[i*B:(i+1)*B])`: equal `h_i` means, up to a 128-bit collision, the same model and the same
first (i + 1) * B tokens. Only full blocks get a hash, as in vLLM's automatic prefix caching. Imports nothing beyond
the standard library, so the gateway uses it without torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

DIGEST_BYTES = 16


def chain_seed(model_fingerprint: str, block_size: int) -> bytes:
    """The root of every chain of one model at one block size (a different block size gives other keys)."""
    if block_size < 1:
        raise ValueError(f"prefix hash block size must be >= 1, got {block_size}")
    return hashlib.blake2b(f"dsv4-prefix:{model_fingerprint}:{block_size}".encode(), digest_size=DIGEST_BYTES).digest()


def chain_hashes(seed: bytes, token_ids: Sequence[int], block_size: int, max_blocks: int | None = None) -> list[str]:
    """Hex hashes of the full blocks of `token_ids` (at most `max_blocks` of them), in order."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out: list[str] = []
    parent = seed
    for i in range(n):
        block = token_ids[i * block_size : (i + 1) * block_size]
        parent = hashlib.blake2b(parent + struct.pack(f"<{block_size}I", *block), digest_size=DIGEST_BYTES).digest()
        out.append(parent.hex())
    return out


def tail_hash(parent: bytes, tail: Sequence[int]) -> str:
    """The hash of a prompt that ends `len(tail)` tokens past a block boundary: `parent` is the chain hash (raw) of
    its last full block, or the seed. Distinct from every chain hash (a chain hash covers a whole block)."""
    data = parent + b"tail" + struct.pack(f"<{len(tail)}I", *tail)
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()
