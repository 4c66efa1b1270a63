"""Reference token sampling: temperature, top-k / top-p / min-p filtering and Gumbel-max draws, all rows at once,
and the seeded Gumbel noise of the engine's draws (a counter-based hash of (seed, token index, token id)).

No value is read on the host: a filter no row uses is passed as None by the caller, which knows it from the
requests' parameters (on a GPU, inspecting the tensors to skip the sorts would stall every step).
"""

from __future__ import annotations

import torch

from dsv4.kernels.registry import register

_LSR_MASK = {n: (1 << (32 - n)) - 1 for n in (15, 16)}


def _int32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


_MIX_A, _MIX_B = _int32(0x7FEB352D), _int32(0x846CA68B)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), a bijective 32-bit hash, on int32 tensors holding uint32 bit patterns.

    Relies on int32 multiplication wrapping modulo 2^32, as CPU and GPU kernels do (checked against a pure
    Python version in tests/unit/model_runtime/engine/test_sampling_batch.py); `>>` is arithmetic on int32, so the
    logical shift masks."""
    x = x ^ ((x >> 16) & _LSR_MASK[16])
    x = x * _MIX_A
    x = x ^ ((x >> 15) & _LSR_MASK[15])
    x = x * _MIX_B
    return x ^ ((x >> 16) & _LSR_MASK[16])


def _low32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values as int32 bit patterns."""
    low = x & 0xFFFFFFFF
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)


def gumbel_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [R, vocab] fp64 that decides generated token index[r] of a request seeded seeds[r].

    u = (mix32(key ^ token id) + 0.5) / 2^32 with key = mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ index): a
    different permutation of the 2^32 grid per (seed, index), the same numbers on every device."""
    key = mix32(mix32(mix32(_low32(seeds)) ^ _low32(seeds >> 32)) ^ _low32(index))
    bits = mix32(key[:, None] ^ torch.arange(vocab, dtype=torch.int32, device=seeds.device))
    u = (bits.double() + (2.0**31 + 0.5)) * 2.0**-32  # the int32 pattern, offset to (0, 1)
    return -torch.log(-torch.log(u))


@register("filter_logits", "reference")
def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    x = logits.double() / temperature.double()[:, None]
    vocab = x.shape[-1]
    if top_k is not None:
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = torch.sort(x, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is None and min_p is None:
        return x
    probs = torch.softmax(x, dim=-1)
    drop = torch.zeros_like(x, dtype=torch.bool)
    if top_p is not None:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly ahead of each token
        # The smallest prefix whose mass reaches top_p is kept; rows with top_p = 1 keep everything.
        drop_sorted = (before >= top_p.double()[:, None]) & (top_p < 1.0)[:, None]
        drop = drop.scatter(-1, order, drop_sorted)
    if min_p is not None:
        drop |= probs < min_p.double()[:, None] * probs.max(-1, keepdim=True).values
    return x.masked_fill(drop, float("-inf"))


@register("sample_tokens", "reference")
def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    best = torch.argmax(logits, dim=-1)
    if noise is None:
        return best
    greedy = temperature <= 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    # argmax(filtered logits + Gumbel noise) is a draw from softmax(filtered logits); excluded tokens stay -inf.
    drawn = torch.argmax(filter_logits(logits, safe_t, top_k, top_p, min_p) + noise, dim=-1)
    return torch.where(greedy, best, drawn)


@register("sample_tokens_seeded", "reference")
def sample_tokens_seeded(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    seeds: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    return sample_tokens(logits, temperature, top_k, top_p, min_p, gumbel_noise(seeds, index, logits.shape[-1]))
