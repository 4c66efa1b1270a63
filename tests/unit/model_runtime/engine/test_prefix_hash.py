"""Chained block hashes: equal exactly when model, block size and every token up to the block are equal."""

from __future__ import annotations

import pytest

from dsv4.model_runtime.engine.prefix_hash import chain_hashes, chain_seed

pytestmark = pytest.mark.unit

SEED = chain_seed("fingerprint-a", 4)


def test_only_full_blocks_are_hashed_and_max_blocks_caps_them() -> None:
    assert len(chain_hashes(SEED, list(range(11)), 4)) == 2
    assert len(chain_hashes(SEED, list(range(12)), 4)) == 3
    assert len(chain_hashes(SEED, list(range(12)), 4, max_blocks=1)) == 1
    assert chain_hashes(SEED, [1, 2, 3], 4) == []


def test_a_shared_prefix_shares_its_hashes_and_diverges_after() -> None:
    a = chain_hashes(SEED, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], 4)
    b = chain_hashes(SEED, [5, 6, 7, 8, 9, 10, 11, 99, 13, 14, 15, 16], 4)
    assert a[0] == b[0] and a[1] != b[1]
    assert a[2] != b[2]  # chained: a later equal block does not make the hash equal again


def test_model_and_block_size_change_every_hash() -> None:
    tokens = list(range(8))
    base = chain_hashes(SEED, tokens, 4)
    assert set(base).isdisjoint(chain_hashes(chain_seed("fingerprint-b", 4), tokens, 4))
    assert set(base).isdisjoint(chain_hashes(chain_seed("fingerprint-a", 2), tokens, 2))
    with pytest.raises(ValueError, match="block size"):
        chain_seed("f", 0)
