"""Sampling on the `cuda` backend: Triton kernels for every filter the reference has. Temperature + top-k draws
take two kernels (`filter_logits`: three); rows with top-p or min-p take the nucleus path (below).

Why no softmax on the top-k path: the caller's Gumbel noise makes the draw argmax(logits / T + noise) over the kept
tokens, so probabilities are never formed. Why no sort: top-k only needs the row's k-th largest logit (the
contract keeps every token >= it, ties included), found in three steps, never over the whole row:

1. `_scan_kernel`, a program per (row, chunk of CHUNK tokens): one read of the logits. For a row with top-k it
   writes the maximum of every block of SUB tokens (with the block's number); for a row without, it also reads
   the noise and writes the chunk's best (logits / T + noise, or the raw logit in a greedy row) and its token.
2. `_pick_kernel`, a program per row: the k-th largest block maximum is a lower bound of the k-th largest logit
   (k blocks have a maximum at least that large, each its own token), and every token >= the k-th largest
   logit lies in a block whose maximum passes that bound. When at most KMAX blocks pass it, those blocks (at most
   KMAX x SUB tokens, read again from L2) hold the exact k-th largest logit, and the draw is taken over them,
   reading the noise of the kept tokens only. Otherwise (k > KMAX, or more than KMAX blocks tie at the bound)
   the row takes the exact slow path: a 32-step bisection over the order-preserving integer image of the
   logits, then one pass for the draw; correct, and much slower (32 passes over the row).
3. `filter_logits` only: `_filter_kernel` writes logits / T in fp64 with the tokens under the threshold at -inf.

The nucleus path (top-p, min-p, with or without top-k), all programs per (row, chunk) but the last:

1. top-k's threshold as above (steps 1-2 without noise), when a row has top-k;
2. `_stats_kernel`: each chunk's share of the softmax over the kept tokens (its largest x = logits / T and the
   sum of exp(x - it)); every later program combines the shares of its row in the same fixed order into the
   row's (m, z), so probabilities p = exp(x - m) / z are never stored;
3. top-p only, ROUNDS `_radix_kernel` launches, a radix select of the boundary key RADIX_BITS at a time: each
   round histograms the probability mass (and count) of the kept tokens in the range chosen so far by their next
   digit; the next round's programs (and `_keep_kernel` after the last) read it and keep the highest bin whose
   mass, with all mass above it, reaches top_p. After the last round the boundary key is exact, with the mass
   strictly above it; the tokens tied at it are kept in id order (as the reference's stable sort orders them)
   while the mass ahead of each, above + rank x p, stays below top_p;
4. `_keep_kernel`: min-p keeps p >= min_p x the largest probability (exp(0) / z); the kept tokens' filtered x
   (`filter_logits`), or each chunk's best x + noise among them (a draw; greedy rows: the raw argmax);
5. a draw: `_argmax_chunks_kernel`, a program per row, takes the best chunk's token.

That is 11 launches for a top-p draw (13 with top-k), each reading the row once (from L2 after the first), against
the reference's two sorts of the [B, V] fp64 row. The kept set equals the reference's except where the mass ahead
of a token is within rounding (~1e-16) of top_p: the two sum the same probabilities in different orders.

"Reads the noise" is a load from the caller's [B, V] tensor for `sample_tokens`, and for `sample_tokens_seeded`
(the engine's draw) the reference's counter-based hash of (seed, token index, token id) computed in registers,
so a top-k row never touches noise memory and the engine never builds the [B, V] fp64 noise.

Comparisons use the fp32 logits: dividing by a positive T in fp64 keeps the order of distinct fp32 values and
their ties, so "x / T >= k-th largest x / T" is "x >= k-th largest x". The drawn token equals the reference's
(same fp64 division and sum; the largest score wins, the lowest token id among equal ones), so the engine's
seeded draws stay independent of the batch. Each row is its own program in step 2 and its own chunks in step 1
(on the nucleus path: its own programs in every step).

NOT RUN ON GPU HARDWARE: tested in fp32 under Triton's interpreter (tests/unit/kernels/test_sampling_kernels.py)
and compiled for sm_90 without a GPU; speed unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cuda.launch import block, check_device
from dsv4.kernels.reference import sampling as ref_sampling
from dsv4.kernels.registry import register

CHUNK = 2048  # tokens per program of the scan (Flash's 129,280-token vocabulary: 64 chunks a row)
SUB = 32  # tokens per block whose maximum the scan keeps
KMAX = 128  # top-k values up to this take the block path; larger ones the bisection
# warps: ptxas for sm_90 gives the scan 85 registers at 8 warps (150 at 4,096-token chunks), the pick kernel 126 at
# 16 warps (at 8 it spills: its [KMAX, SUB] gathered tile is 16 values a thread)
SAMPLE_WARPS = 8
PICK_WARPS = 16
_I32_MIN = -(2**31)


@triton.jit
def _key32(v):
    """fp32 -> int32 with the same order (negative floats: magnitude bits flipped); -0.0 ties with +0.0."""
    bits = tl.where(v == 0.0, 0.0, v).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _best(y, idx):
    """(largest value, lowest index holding it) of y."""
    m = tl.max(y, axis=0)
    return m, tl.min(tl.where(y == m, idx, 2147483647), axis=0)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32, as `mix32` of kernels/reference/sampling.py computes it on int32 bit patterns."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _noise(noise_ptr, seeds_ptr, index_ptr, b, V, ids, mask, SEEDED: tl.constexpr):
    """Gumbel noise of row b at token ids `ids` (0 where not `mask`): the caller's tensor, or with SEEDED the
    reference's `gumbel_noise` hash of (seed, token index, id), computed here for these ids only."""
    if SEEDED:
        seed = tl.load(seeds_ptr + b)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        at = (tl.load(index_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32(_mix32(_mix32(lo) ^ hi) ^ at)
        bits = _mix32(key ^ ids.to(tl.uint32))
        # the reference's int32 pattern + 2^31 is the uint32 pattern with its top bit flipped
        u = ((bits ^ 0x80000000).to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2^-32
        return tl.where(mask, -tl.log(-tl.log(u)), 0.0)
    else:
        return tl.load(noise_ptr + b * V + ids, mask=mask, other=0.0)


@triton.jit
def _row_flags(temp_ptr, topk_ptr, b, V, HAS_TOPK: tl.constexpr, HAS_NOISE: tl.constexpr):
    """(temperature in fp64, k, whether the row is top-k filtered); a greedy row of a draw is never filtered."""
    t = tl.load(temp_ptr + b).to(tl.float64)
    k = tl.load(topk_ptr + b).to(tl.int64) if HAS_TOPK else tl.zeros([], dtype=tl.int64)
    filtered = (k > 0) & (k < V)
    if HAS_NOISE:
        # (tl.where: Triton 3.9's interpreter cannot AND the int1 of an fp64 comparison with another int1)
        filtered = tl.where(t > 0, filtered, False)
    return t, k, filtered


@triton.jit
def _scan_kernel(
    logits_ptr,
    temp_ptr,
    topk_ptr,
    noise_ptr,
    seeds_ptr,
    index_ptr,
    maxima_ptr,
    best_val_ptr,
    best_idx_ptr,
    V,
    C,
    HAS_TOPK: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SEEDED: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    v = tl.load(logits_ptr + b * V + idx, mask=ok, other=float("-inf")).to(tl.float32)
    t, _, filtered = _row_flags(temp_ptr, topk_ptr, b, V, HAS_TOPK, HAS_NOISE)
    if filtered:
        key = tl.where(ok, _key32(v), -2147483648)
        block_max = tl.max(tl.reshape(key, [CHUNK // SUB, SUB]), axis=1)
        blocks = c * (CHUNK // SUB) + tl.arange(0, CHUNK // SUB)
        tl.store(
            maxima_ptr + (b * C + c) * (CHUNK // SUB) + tl.arange(0, CHUNK // SUB),
            (block_max.to(tl.int64) << 32) | blocks,
        )
    if HAS_NOISE:  # noqa: SIM102 (a compile-time branch around a run-time one: Triton cannot `and` the two)
        if filtered == 0:
            greedy = t <= 0
            noise = _noise(noise_ptr, seeds_ptr, index_ptr, b, V, idx, tl.where(t > 0, ok, False), SEEDED)
            y = tl.where(greedy, v.to(tl.float64), v.to(tl.float64) / tl.where(greedy, 1.0, t) + noise)
            m, i = _best(tl.where(ok, y, float("-inf")), idx)
            tl.store(best_val_ptr + b * C + c, m)
            tl.store(best_idx_ptr + b * C + c, i)


@triton.jit
def _pick_kernel(
    logits_ptr,
    temp_ptr,
    topk_ptr,
    noise_ptr,
    seeds_ptr,
    index_ptr,
    maxima_ptr,
    best_val_ptr,
    best_idx_ptr,
    out_ptr,
    V,
    C,
    HAS_TOPK: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SEEDED: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    KMAX: tl.constexpr,
    CP: tl.constexpr,
    MP: tl.constexpr,
):
    """A draw: out[b] = the token (int64). Without noise: out[b] = the row's threshold key (int32; INT32_MIN keeps
    every token)."""
    b = tl.program_id(0).to(tl.int64)
    t, k, filtered = _row_flags(temp_ptr, topk_ptr, b, V, HAS_TOPK, HAS_NOISE)
    thr = tl.full([], -2147483648, tl.int32)
    token = tl.zeros([], dtype=tl.int32)
    slow = filtered & (k > KMAX)
    if filtered & (k <= KMAX):
        n_blocks = C * (CHUNK // SUB)
        j = tl.arange(0, MP)
        maxima = tl.load(maxima_ptr + b * n_blocks + j, mask=j < n_blocks, other=-9223372036854775808)
        top = tl.topk(maxima, KMAX)  # the KMAX largest block maxima, largest first
        rank = tl.arange(0, KMAX)
        bound = (tl.sum(tl.where(rank == k - 1, top, 0)) >> 32).to(tl.int32)
        passing = tl.sum((((maxima >> 32).to(tl.int32) >= bound) & (j < n_blocks)).to(tl.int32))
        slow = passing > KMAX
        if passing <= KMAX:
            # every block that passes is among the KMAX (the padding past the row's blocks never counts)
            chosen = ((top >> 32).to(tl.int32) >= bound) & (top != -9223372036854775808)
            gidx = ((top & 0xFFFFFFFF) * SUB)[:, None] + tl.arange(0, SUB)[None, :]  # [KMAX, SUB]
            gok = chosen[:, None] & (gidx < V)
            gv = tl.load(logits_ptr + b * V + gidx, mask=gok, other=float("-inf")).to(tl.float32)
            gkey = tl.where(gok, _key32(gv), -2147483648)
            thr = tl.sum(tl.where(rank == k - 1, tl.topk(tl.reshape(gkey, [KMAX * SUB]), KMAX), 0))
            if HAS_NOISE:
                keep = gok & (gkey >= thr)
                noise = _noise(noise_ptr, seeds_ptr, index_ptr, b, V, gidx, keep, SEEDED)
                y = tl.where(keep, gv.to(tl.float64) / t + noise, float("-inf"))
                _, token = _best(tl.reshape(y, [KMAX * SUB]), tl.reshape(gidx, [KMAX * SUB]).to(tl.int32))
    if slow:
        # exact k-th largest key: the largest key with at least k tokens at or above it, by bisection
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            count = tl.zeros([], dtype=tl.int64)
            for c0 in range(0, V, CHUNK):
                idx = c0 + tl.arange(0, CHUNK)
                v = tl.load(logits_ptr + b * V + idx, mask=idx < V, other=0.0).to(tl.float32)
                count += tl.sum(((_key32(v).to(tl.int64) >= mid) & (idx < V)).to(tl.int64))
            lo = tl.where(count >= k, mid, lo)
            hi = tl.where(count >= k, hi, mid - 1)
        thr = lo.to(tl.int32)
        if HAS_NOISE:
            best = tl.full([], float("-inf"), tl.float64)
            for c0 in range(0, V, CHUNK):
                idx = c0 + tl.arange(0, CHUNK)
                v = tl.load(logits_ptr + b * V + idx, mask=idx < V, other=0.0).to(tl.float32)
                keep = (idx < V) & (_key32(v) >= thr)
                noise = _noise(noise_ptr, seeds_ptr, index_ptr, b, V, idx, keep, SEEDED)
                m, i = _best(tl.where(keep, v.to(tl.float64) / t + noise, float("-inf")), idx)
                token = tl.where(m > best, i, token)  # an equal later chunk has higher ids: keep the earlier
                best = tl.maximum(m, best)
    if HAS_NOISE:
        if filtered == 0:
            cj = tl.arange(0, CP)
            vals = tl.load(best_val_ptr + b * C + cj, mask=cj < C, other=float("-inf"))
            _, at = _best(vals, cj)  # the earliest chunk holding the best: its token is the lowest id
            token = tl.load(best_idx_ptr + b * C + at)
        tl.store(out_ptr + b, token.to(tl.int64))
    else:
        tl.store(out_ptr + b, thr)


@triton.jit
def _filter_kernel(logits_ptr, temp_ptr, thr_ptr, out_ptr, V, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    v = tl.load(logits_ptr + b * V + idx, mask=ok, other=0.0).to(tl.float32)
    x = v.to(tl.float64) / tl.load(temp_ptr + b).to(tl.float64)
    keep = _key32(v) >= tl.load(thr_ptr + b)
    tl.store(out_ptr + b * V + idx, tl.where(keep, x, float("-inf")), mask=ok)


def _select(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeded: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Steps 1-2 of the module docstring: the tokens [B] int64 of a draw (with the caller's noise, or the noise of
    `seeded` = (seeds, token index) hashed in the kernels), or without either the threshold keys [B] int32."""
    rows, vocab = logits.shape
    chunk = block(vocab, minimum=SUB, maximum=chunk)
    chunks = triton.cdiv(vocab, chunk)
    mp = block(chunks) * (chunk // SUB)
    kmax = min(KMAX, mp)
    x, t = logits.contiguous(), temperature.contiguous()
    k = top_k.contiguous() if top_k is not None else t
    nz = noise.contiguous() if noise is not None else x
    seeds, index = (seeded[0].contiguous(), seeded[1].contiguous()) if seeded is not None else (k, k)
    draw = noise is not None or seeded is not None
    device = logits.device
    maxima = torch.empty(rows, chunks * (chunk // SUB), dtype=torch.int64, device=device)
    best_val = torch.empty(rows, chunks, dtype=torch.float64, device=device)
    best_idx = torch.empty(rows, chunks, dtype=torch.int32, device=device)
    out = torch.empty(rows, dtype=torch.int64 if draw else torch.int32, device=device)
    flags = dict(HAS_TOPK=top_k is not None, HAS_NOISE=draw, SEEDED=seeded is not None, CHUNK=chunk, SUB=SUB)
    common = (x, t, k, nz, seeds, index, maxima, best_val, best_idx)
    _scan_kernel[(rows, chunks)](*common, vocab, chunks, **flags, num_warps=SAMPLE_WARPS)
    _pick_kernel[(rows,)](
        *common, out, vocab, chunks, **flags, KMAX=kmax, CP=block(chunks), MP=mp, num_warps=PICK_WARPS
    )
    return out


# The nucleus path (top-p / min-p rows): a radix select over the 32-bit keys, RADIX_BITS a round
RADIX_BITS = 4
BINS = 1 << RADIX_BITS
ROUNDS = 32 // RADIX_BITS
TILE = 256  # tokens per step of a round's histogram ([TILE, BINS] fp64 masses: 16 a thread at 8 warps)


@triton.jit
def _row_temperature(temp_ptr, b):
    """The row's temperature in fp64, 1 in a greedy row (the reference's `safe_t`: its filters are never used)."""
    t = tl.load(temp_ptr + b).to(tl.float64)
    return tl.where(t > 0, t, 1.0)


@triton.jit
def _stats_kernel(logits_ptr, temp_ptr, thr_ptr, cmax_ptr, csum_ptr, V, C, CHUNK: tl.constexpr):
    """Per (row, chunk): the largest x = logits / T among the tokens top-k keeps (key >= thr) and the sum of
    exp(x - that largest): the chunk's share of the softmax."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    v = tl.load(logits_ptr + b * V + idx, mask=ok, other=float("-inf")).to(tl.float32)
    keep = ok & (_key32(v) >= tl.load(thr_ptr + b))
    x = tl.where(keep, v.to(tl.float64) / _row_temperature(temp_ptr, b), float("-inf"))
    m = tl.max(x, axis=0)
    tl.store(cmax_ptr + b * C + c, m)
    tl.store(csum_ptr + b * C + c, tl.sum(tl.where(keep, tl.exp(tl.where(keep, x, m) - m), 0.0), axis=0))


@triton.jit
def _row_stats(cmax_ptr, csum_ptr, b, C, CP: tl.constexpr):
    """(m, z): the row's largest kept x and the softmax denominator sum(exp(x - m)), from the chunks' shares in a
    fixed order (every program of the row computes the same two numbers)."""
    j = tl.arange(0, CP)
    cm = tl.load(cmax_ptr + b * C + j, mask=j < C, other=float("-inf"))
    cs = tl.load(csum_ptr + b * C + j, mask=j < C, other=0.0)
    m = tl.max(cm, axis=0)
    empty = cm == float("-inf")  # a chunk top-k left nothing in (-inf - -inf would be nan)
    return m, tl.sum(tl.where(empty, 0.0, cs * tl.exp(tl.where(empty, m, cm) - m)), axis=0)


@triton.jit
def _walk_step(
    hist_ptr, prefix_ptr, above_ptr, b, C, rnd, top_p, CP: tl.constexpr, BINS: tl.constexpr, ROUNDS: tl.constexpr
):
    """(prefix, above) after round `rnd` - 1 of the row's radix select: the high digits of the boundary key chosen
    so far (unsigned key image) and the mass of the tokens above them; round 0 starts from (0, 0).

    The step reads the state after the round before (stored by that round's first chunk) and that round's
    histograms, and keeps the highest bin whose mass, with everything above it, reaches top_p: the boundary token
    (the last the nucleus keeps) lies there. When no bin reaches it (the row's mass summed below top_p by
    rounding), bin 0: everything in range is kept."""
    prefix = tl.zeros([], dtype=tl.int64)
    above = tl.zeros([], dtype=tl.float64)
    if rnd > 0:
        r = rnd - 1
        prefix = tl.load(prefix_ptr + b * ROUNDS + r)
        above = tl.load(above_ptr + b * ROUNDS + r)
        cj = tl.arange(0, CP)[:, None]
        d = tl.arange(0, BINS)
        h = tl.load(hist_ptr + ((b * ROUNDS + r) * C + cj) * BINS + d[None, :], mask=cj < C, other=0.0)
        h = tl.sum(h, axis=0)
        incl = above + tl.sum(tl.where(d[None, :] >= d[:, None], h[None, :], 0.0), axis=1)
        digit = tl.max(tl.where(incl >= top_p, d, 0), axis=0)
        above += tl.sum(tl.where(d > digit, h, 0.0), axis=0)
        prefix = prefix * BINS + digit
    return prefix, above


@triton.jit
def _radix_kernel(
    logits_ptr,
    temp_ptr,
    topp_ptr,
    thr_ptr,
    cmax_ptr,
    csum_ptr,
    hist_ptr,
    count_ptr,
    prefix_ptr,
    above_ptr,
    V,
    C,
    rnd,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    CP: tl.constexpr,
    BINS: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    ROUNDS: tl.constexpr,
):
    """Round `rnd` of a top-p row's radix select, per (row, chunk): the probability mass and the number of the kept
    tokens inside the range chosen so far, by their next digit."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    top_p = tl.load(topp_ptr + b).to(tl.float64)
    if top_p < 1.0:
        t = _row_temperature(temp_ptr, b)
        thr = tl.load(thr_ptr + b)
        m, z = _row_stats(cmax_ptr, csum_ptr, b, C, CP)
        prefix, above = _walk_step(hist_ptr, prefix_ptr, above_ptr, b, C, rnd, top_p, CP, BINS, ROUNDS)
        if c == 0:  # the state the next round starts from
            tl.store(prefix_ptr + b * ROUNDS + rnd, prefix)
            tl.store(above_ptr + b * ROUNDS + rnd, above)
        shift = 32 - RADIX_BITS * rnd  # the bits below the chosen digits
        d = tl.arange(0, BINS)
        mass = tl.zeros([BINS], dtype=tl.float64)
        count = tl.zeros([BINS], dtype=tl.int32)
        for s in range(0, CHUNK, TILE):
            idx = c * CHUNK + s + tl.arange(0, TILE)
            ok = idx < V
            v = tl.load(logits_ptr + b * V + idx, mask=ok, other=float("-inf")).to(tl.float32)
            key = _key32(v)
            u = key.to(tl.int64) + 2147483648  # the unsigned image: same order, 0 .. 2^32 - 1
            keep = ok & (key >= thr) & ((u >> shift) == prefix)
            p = tl.where(keep, tl.exp(v.to(tl.float64) / t - m) / z, 0.0)
            hit = (((u >> (shift - RADIX_BITS)) & (BINS - 1))[:, None] == d[None, :]) & keep[:, None]
            mass += tl.sum(tl.where(hit, p[:, None], 0.0), axis=0)
            count += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(hist_ptr + ((b * ROUNDS + rnd) * C + c) * BINS + d, mass)
        tl.store(count_ptr + (b * C + c) * BINS + d, count)


@triton.jit
def _keep_kernel(
    logits_ptr,
    temp_ptr,
    topp_ptr,
    minp_ptr,
    thr_ptr,
    cmax_ptr,
    csum_ptr,
    hist_ptr,
    count_ptr,
    prefix_ptr,
    above_ptr,
    noise_ptr,
    seeds_ptr,
    index_ptr,
    out_ptr,
    best_val_ptr,
    best_idx_ptr,
    V,
    C,
    HAS_TOPP: tl.constexpr,
    HAS_MINP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SEEDED: tl.constexpr,
    CHUNK: tl.constexpr,
    CP: tl.constexpr,
    BINS: tl.constexpr,
    ROUNDS: tl.constexpr,
):
    """Per (row, chunk): which tokens the filters keep, then either the filtered x (no noise: `filter_logits`) or
    the chunk's best kept x + noise and its token (a draw; greedy rows: the raw logits, nothing filtered)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    ok = idx < V
    v = tl.load(logits_ptr + b * V + idx, mask=ok, other=float("-inf")).to(tl.float32)
    key = _key32(v)
    x = v.to(tl.float64) / _row_temperature(temp_ptr, b)
    topk = ok & (key >= tl.load(thr_ptr + b))
    keep = topk
    m, z = _row_stats(cmax_ptr, csum_ptr, b, C, CP)
    p = tl.exp(x - m) / z
    if HAS_MINP:
        # the reference: probs < min_p * probs.max(), and the largest probability is exp(0) / z
        keep = tl.where(p < tl.load(minp_ptr + b).to(tl.float64) * (1.0 / z), False, keep)
    if HAS_TOPP:
        top_p = tl.load(topp_ptr + b).to(tl.float64)
        if top_p < 1.0:
            prefix, above = _walk_step(hist_ptr, prefix_ptr, above_ptr, b, C, ROUNDS, top_p, CP, BINS, ROUNDS)
            tau = prefix - 2147483648  # the boundary key
            k64 = key.to(tl.int64)
            # tokens tied at the boundary go in id order (the reference's stable sort): rank = tied tokens before
            tie = topk & (k64 == tau)
            cj = tl.arange(0, CP)
            before = tl.sum(tl.load(count_ptr + (b * C + cj) * BINS + (prefix & (BINS - 1)), mask=cj < c, other=0))
            rank = before + tl.cumsum(tie.to(tl.int32), axis=0) - 1
            tie_kept = tl.where(above + rank.to(tl.float64) * p < top_p, tie, False)
            keep = keep & ((k64 > tau) | tie_kept)
    if HAS_NOISE:
        greedy = tl.load(temp_ptr + b) <= 0
        keep = tl.where(greedy, ok, keep)
        noise = _noise(noise_ptr, seeds_ptr, index_ptr, b, V, idx, tl.where(greedy, False, keep), SEEDED)
        y = tl.where(greedy, v.to(tl.float64), x + noise)
        best, at = _best(tl.where(keep, y, float("-inf")), idx)
        tl.store(best_val_ptr + b * C + c, best)
        tl.store(best_idx_ptr + b * C + c, at)
    else:
        tl.store(out_ptr + b * V + idx, tl.where(keep, x, float("-inf")), mask=ok)


@triton.jit
def _argmax_chunks_kernel(best_val_ptr, best_idx_ptr, out_ptr, C, CP: tl.constexpr):
    """out[b] = the token of the row's best chunk (the earliest among equals: its token is the lowest id)."""
    b = tl.program_id(0).to(tl.int64)
    cj = tl.arange(0, CP)
    _, at = _best(tl.load(best_val_ptr + b * C + cj, mask=cj < C, other=float("-inf")), cj)
    tl.store(out_ptr + b, tl.load(best_idx_ptr + b * C + at).to(tl.int64))


def _nucleus(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeded: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """The top-p / min-p path (module docstring): a draw's tokens [B] int64, or without noise the filtered x [B, V]
    fp64."""
    rows, vocab = logits.shape
    device = logits.device
    x, t = logits.contiguous(), temperature.contiguous()
    if top_k is not None:
        thr = _select(x, t, top_k, None, chunk=chunk)
    else:
        thr = torch.full((rows,), _I32_MIN, dtype=torch.int32, device=device)
    chunk = block(vocab, minimum=TILE, maximum=chunk)
    chunks = triton.cdiv(vocab, chunk)
    cp = block(chunks)
    cmax = torch.empty(rows, chunks, dtype=torch.float64, device=device)
    csum = torch.empty_like(cmax)
    grid = (rows, chunks)
    _stats_kernel[grid](x, t, thr, cmax, csum, vocab, chunks, CHUNK=chunk, num_warps=SAMPLE_WARPS)
    shape = dict(CP=cp, BINS=BINS, ROUNDS=ROUNDS)
    hist = torch.empty(rows, ROUNDS, chunks, BINS, dtype=torch.float64, device=device)
    count = torch.empty(rows, chunks, BINS, dtype=torch.int32, device=device)
    prefix = torch.empty(rows, ROUNDS, dtype=torch.int64, device=device)
    above = torch.empty(rows, ROUNDS, dtype=torch.float64, device=device)
    p = top_p.contiguous() if top_p is not None else t
    state = (hist, count, prefix, above)
    if top_p is not None:
        for rnd in range(ROUNDS):
            _radix_kernel[grid](
                x, t, p, thr, cmax, csum, *state, vocab, chunks, rnd, CHUNK=chunk, TILE=TILE, RADIX_BITS=RADIX_BITS,
                **shape, num_warps=SAMPLE_WARPS,
            )  # fmt: skip
    mp = min_p.contiguous() if min_p is not None else t
    draw = noise is not None or seeded is not None
    nz = noise.contiguous() if noise is not None else x
    seeds, index = (seeded[0].contiguous(), seeded[1].contiguous()) if seeded is not None else (thr, thr)
    out = torch.empty(rows, vocab if not draw else 0, dtype=torch.float64, device=device)
    best_val = torch.empty(rows, chunks, dtype=torch.float64, device=device)
    best_idx = torch.empty(rows, chunks, dtype=torch.int32, device=device)
    _keep_kernel[grid](
        x, t, p, mp, thr, cmax, csum, *state, nz, seeds, index, out, best_val, best_idx, vocab, chunks,
        HAS_TOPP=top_p is not None, HAS_MINP=min_p is not None, HAS_NOISE=draw, SEEDED=seeded is not None,
        CHUNK=chunk, **shape, num_warps=SAMPLE_WARPS,
    )  # fmt: skip
    if not draw:
        return out
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    _argmax_chunks_kernel[(rows,)](best_val, best_idx, tokens, chunks, CP=cp, num_warps=1)
    return tokens


def _draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor | None,
    seeded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A draw's tokens [B] int64: the nucleus path when a row has top-p or min-p, else the top-k path."""
    if top_p is not None or min_p is not None:
        return _nucleus(logits, temperature, top_k, top_p, min_p, noise, seeded)
    return _select(logits, temperature, top_k, noise, seeded)


def _triton_dtype(logits: torch.Tensor) -> bool:
    """Whether the kernels take these logits: no wider than fp32 (they compare fp32 keys), and some rows."""
    return logits.dtype != torch.float64 and logits.numel() > 0


@register("filter_logits", "cuda")
def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    check_device("filter_logits", logits, temperature, top_k, top_p, min_p)
    if not _triton_dtype(logits):
        return ref_sampling.filter_logits(logits, temperature, top_k, top_p, min_p)
    if top_p is not None or min_p is not None:
        return _nucleus(logits, temperature, top_k, top_p, min_p, None)
    rows, vocab = logits.shape
    thr = _select(logits, temperature, top_k, None)
    out = torch.empty(rows, vocab, dtype=torch.float64, device=logits.device)
    chunk = block(vocab, minimum=SUB, maximum=CHUNK)
    _filter_kernel[(rows, triton.cdiv(vocab, chunk))](
        logits.contiguous(), temperature.contiguous(), thr, out, vocab, CHUNK=chunk, num_warps=SAMPLE_WARPS
    )
    return out


@register("sample_tokens", "cuda")
def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    check_device("sample_tokens", logits, temperature, top_k, top_p, min_p, noise)
    if noise is None:  # every row greedy
        return torch.argmax(logits, dim=-1)
    if not _triton_dtype(logits):
        return ref_sampling.sample_tokens(logits, temperature, top_k, top_p, min_p, noise)
    return _draw(logits, temperature, top_k, top_p, min_p, noise)


@register("sample_tokens_seeded", "cuda")
def sample_tokens_seeded(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    seeds: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    check_device("sample_tokens_seeded", logits, temperature, top_k, top_p, min_p, seeds, index)
    if not _triton_dtype(logits):  # the reference materializes the [B, V] noise
        return ref_sampling.sample_tokens_seeded(logits, temperature, top_k, top_p, min_p, seeds, index)
    return _draw(logits, temperature, top_k, top_p, min_p, None, (seeds, index))
