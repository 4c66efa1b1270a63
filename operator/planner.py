"""The planner: queue backlog and latency → desired prefill and decode replicas (docs/operator.md). Pure functions.

Per pool, the backlog (lag + pending of its Redis consumer group) and the p95 latency the pool answers for (TTFT for
prefill, inter-token latency for decode) give a wanted size. Scale-up happens as soon as either signal is over its
target; scale-down only when both sit well under it (the hysteresis band), one replica at a time. Each direction has
its own cooldown. Finally the pair is moved to the nearest point that satisfies min/max of both pools and the
prefill:decode ratio bounds; those are hard constraints and win over cooldowns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Scale down only when the smaller pool would still run at most this fraction of the targets.
DOWN_BAND = 0.5
# Never more than double a pool in one step: a burst that outgrows that is met over the next intervals.
MAX_UP_FACTOR = 2


@dataclass(frozen=True)
class PoolInput:
    """What the planner knows about one pool."""

    replicas: int
    min_replicas: int
    max_replicas: int
    backlog: int  # lag + pending of the pool's consumer group
    latency_ms: float | None  # p95 TTFT (prefill) or ITL (decode) over the last interval; None = no data
    latency_target_ms: float
    seconds_since_scale: float | None  # None = never scaled


@dataclass(frozen=True)
class Policy:
    """The autoscaling knobs of the spec."""

    queue_per_replica: int
    min_ratio: float  # prefill / decode
    max_ratio: float
    up_cooldown_s: float
    down_cooldown_s: float
    scale_prefill: bool = True  # False with disaggregation mode never: prefill is left alone and the ratio ignored


@dataclass(frozen=True)
class Decision:
    """The planner's answer for one pool, with the reason recorded in its Event."""

    pool: str
    current: int
    desired: int
    reason: str

    @property
    def changed(self) -> bool:
        """Whether the pool must be resized."""
        return self.desired != self.current


def wanted(pool: PoolInput, policy: Policy) -> tuple[int, str]:
    """The size one pool asks for from its own signals, with hysteresis and cooldowns (before bounds and ratio)."""
    r = pool.replicas
    by_queue = math.ceil(pool.backlog / policy.queue_per_replica)
    over = pool.latency_ms is not None and pool.latency_ms > pool.latency_target_ms
    by_latency = math.ceil(r * pool.latency_ms / pool.latency_target_ms) if over and pool.latency_ms else 0
    up = min(max(by_queue, by_latency), max(r, 1) * MAX_UP_FACTOR)
    since = math.inf if pool.seconds_since_scale is None else pool.seconds_since_scale
    if up > r:
        why = f"backlog {pool.backlog}" if by_queue >= by_latency else f"p95 {pool.latency_ms:.0f} ms"
        if since < policy.up_cooldown_s:
            return r, f"hold: {why} asks for {up}, scale-up cooldown ({since:.0f}s < {policy.up_cooldown_s:.0f}s)"
        return up, f"scale up: {why} over target"
    calm = pool.latency_ms is None or pool.latency_ms <= DOWN_BAND * pool.latency_target_ms
    down = math.ceil(pool.backlog / (policy.queue_per_replica * DOWN_BAND))
    if calm and down < r:
        if since < policy.down_cooldown_s:
            return r, f"hold: scale-down cooldown ({since:.0f}s < {policy.down_cooldown_s:.0f}s)"
        return r - 1, f"scale down: backlog {pool.backlog} and latency well under target"
    return r, "steady: within the hysteresis band"


def clamp(value: int, lo: int, hi: int) -> int:
    """`value` within [lo, hi]."""
    return max(lo, min(hi, value))


def constrain(p: int, d: int, prefill: PoolInput, decode: PoolInput, policy: Policy) -> tuple[int, int]:
    """The (prefill, decode) pair nearest to (p, d) within both pools' bounds and the ratio bounds.

    Ties go to the larger pair (under-provisioning costs requests, over-provisioning costs money for one interval).
    When no pair meets the ratio, each pool is only clamped to its bounds (the operator reports RatioInfeasible).
    """
    d_lo, d_hi = max(decode.min_replicas, 1), max(decode.max_replicas, 1)
    if not policy.scale_prefill:
        return prefill.replicas, clamp(d, d_lo, d_hi)
    best: tuple[int, int, int, int] | None = None
    for dd in range(d_lo, d_hi + 1):
        lo = max(prefill.min_replicas, math.ceil(policy.min_ratio * dd - 1e-9))
        hi = min(prefill.max_replicas, math.floor(policy.max_ratio * dd + 1e-9))
        if lo > hi:
            continue
        pp = clamp(p, lo, hi)
        key = (abs(pp - p) + abs(dd - d), -(pp + dd), pp, dd)
        if best is None or key < best:
            best = key
    if best is None:
        return clamp(p, prefill.min_replicas, prefill.max_replicas), clamp(d, d_lo, d_hi)
    return best[2], best[3]


def plan(prefill: PoolInput, decode: PoolInput, policy: Policy) -> tuple[Decision, Decision]:
    """Desired replicas of both pools and why."""
    p, p_why = wanted(prefill, policy) if policy.scale_prefill else (prefill.replicas, "disaggregation off")
    d, d_why = wanted(decode, policy)
    p2, d2 = constrain(p, d, prefill, decode, policy)
    if p2 != p:
        p_why = f"{p_why}; bounds/ratio move it to {p2}"
    if d2 != d:
        d_why = f"{d_why}; bounds/ratio move it to {d2}"
    return Decision("prefill", prefill.replicas, p2, p_why), Decision("decode", decode.replicas, d2, d_why)


def pick_drain_victims(pods: list[tuple[str, bool, int]], count: int) -> list[str]:
    """The pods to remove on a scale-down of `count`: not-ready first, then the ones with the least pending work.

    `pods` holds (name, ready, pending jobs of that pod's consumer) tuples.
    """
    ranked = sorted(pods, key=lambda p: (p[1], p[2], p[0]))
    return [name for name, _, _ in ranked[: max(count, 0)]]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a Prometheus histogram given cumulative (upper bound, count) buckets, as PromQL computes it.

    Pass the difference between two scrapes to get the quantile over that interval. None when the histogram is empty.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
