"""The planner's pure decisions: bounds and ratio always hold, hysteresis, cooldowns, drain order, quantiles."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.operator.planner import (
    Policy,
    PoolInput,
    constrain,
    histogram_quantile,
    pick_drain_victims,
    plan,
    wanted,
)

pytestmark = pytest.mark.unit

POLICY = Policy(queue_per_replica=4, min_ratio=0.5, max_ratio=2.0, up_cooldown_s=60, down_cooldown_s=300)


def pool(
    replicas: int = 2,
    backlog: int = 0,
    latency: float | None = None,
    since: float | None = None,
    lo: int = 1,
    hi: int = 8,
    target: float = 1000.0,
) -> PoolInput:
    return PoolInput(replicas, lo, hi, backlog, latency, target, since)


def test_backlog_scales_up() -> None:
    p, d = plan(pool(2, backlog=20), pool(2), POLICY)
    assert (p.desired, d.desired) == (4, 2) and p.changed and "backlog 20" in p.reason


def test_scale_up_is_at_most_double() -> None:
    assert wanted(pool(2, backlog=400), POLICY)[0] == 4


def test_latency_over_target_scales_up() -> None:
    size, why = wanted(pool(2, latency=1600), POLICY)
    assert size == 4 and "p95 1600 ms" in why


def test_hysteresis_band_holds_steady() -> None:
    # 7 jobs on 2 replicas is under target (8) but over the scale-down band (1 replica at half target = 2).
    assert wanted(pool(2, backlog=7), POLICY) == (2, "steady: within the hysteresis band")
    # Latency between half the target and the target: no scale-down even with an empty queue.
    assert wanted(pool(3, latency=700), POLICY)[0] == 3


def test_idle_pool_scales_down_one_at_a_time() -> None:
    size, why = wanted(pool(5, backlog=0, latency=100), POLICY)
    assert size == 4 and why.startswith("scale down")


def test_cooldowns() -> None:
    assert wanted(pool(2, backlog=40, since=30), POLICY)[0] == 2
    assert wanted(pool(2, backlog=40, since=61), POLICY)[0] == 4
    size, why = wanted(pool(4, since=200), POLICY)
    assert size == 4 and "scale-down cooldown" in why
    assert wanted(pool(4, since=301), POLICY)[0] == 3


def test_ratio_pulls_the_other_pool_up() -> None:
    # Prefill wants 8 but decode sits at 2: max ratio 2 needs decode >= 4.
    p, d = plan(pool(4, backlog=64, hi=8), pool(2), POLICY)
    assert p.desired / d.desired <= POLICY.max_ratio and d.desired >= 4 and "ratio" in d.reason


def test_disaggregation_off_leaves_prefill_alone() -> None:
    policy = Policy(4, 0.5, 2.0, 0, 0, scale_prefill=False)
    p, d = plan(pool(0, lo=0, hi=0), pool(2, backlog=40), policy)
    assert (p.desired, d.desired) == (0, 4) and not p.changed


def test_infeasible_ratio_only_clamps() -> None:
    assert constrain(9, 9, pool(1, lo=1, hi=1), pool(4, lo=4, hi=4), POLICY) == (1, 4)


pools = st.builds(
    lambda lo, span, r, backlog, lat, since: PoolInput(
        replicas=r,
        min_replicas=lo,
        max_replicas=lo + span,
        backlog=backlog,
        latency_ms=lat,
        latency_target_ms=500.0,
        seconds_since_scale=since,
    ),
    st.integers(1, 6),
    st.integers(0, 10),
    st.integers(0, 20),
    st.integers(0, 500),
    st.one_of(st.none(), st.floats(0, 5000)),
    st.one_of(st.none(), st.floats(0, 1000)),
)
policies = st.builds(
    lambda lo, span, qpr, up, down: Policy(qpr, lo, lo + span, up, down),
    st.floats(0.1, 2.0),
    st.floats(0.0, 3.0),
    st.integers(1, 16),
    st.floats(0, 600),
    st.floats(0, 600),
)


def _feasible(pre: PoolInput, dec: PoolInput, pol: Policy) -> bool:
    return any(
        max(pre.min_replicas, math.ceil(pol.min_ratio * d - 1e-9))
        <= min(pre.max_replicas, math.floor(pol.max_ratio * d + 1e-9))
        for d in range(dec.min_replicas, dec.max_replicas + 1)
    )


@settings(max_examples=400, deadline=None)
@given(pools, pools, policies)
def test_never_outside_bounds_and_ratio_when_feasible(pre: PoolInput, dec: PoolInput, pol: Policy) -> None:
    p, d = plan(pre, dec, pol)
    assert pre.min_replicas <= p.desired <= pre.max_replicas
    assert dec.min_replicas <= d.desired <= dec.max_replicas
    if _feasible(pre, dec, pol):
        assert pol.min_ratio * d.desired - 1e-6 <= p.desired <= pol.max_ratio * d.desired + 1e-6


@settings(max_examples=300, deadline=None)
@given(pools, pools, policies)
def test_nothing_moves_in_cooldown_when_already_valid(pre: PoolInput, dec: PoolInput, pol: Policy) -> None:
    pre = PoolInput(**{**pre.__dict__, "seconds_since_scale": 0.0})
    dec = PoolInput(**{**dec.__dict__, "seconds_since_scale": 0.0})
    valid = (
        pre.min_replicas <= pre.replicas <= pre.max_replicas
        and dec.min_replicas <= dec.replicas <= dec.max_replicas
        and pol.min_ratio * dec.replicas - 1e-9 <= pre.replicas <= pol.max_ratio * dec.replicas + 1e-9
    )
    cooling = pol.up_cooldown_s > 0 and pol.down_cooldown_s > 0
    p, d = plan(pre, dec, pol)
    if valid and cooling:
        assert not p.changed and not d.changed


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(0, 60))
def test_scale_down_steps_by_one(replicas: int, backlog: int) -> None:
    size, _ = wanted(pool(replicas, backlog=backlog, hi=20), POLICY)
    assert size >= replicas - 1


def test_drain_victims_prefer_not_ready_then_least_pending() -> None:
    pods = [("a", True, 3), ("b", True, 0), ("c", False, 5), ("d", True, 1)]
    assert pick_drain_victims(pods, 2) == ["c", "b"]
    assert pick_drain_victims(pods, 0) == []


def test_histogram_quantile_matches_promql() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.99, [(1.0, 0.0), (math.inf, 10.0)]) == 1.0
    assert histogram_quantile(0.95, [(1.0, 0.0), (math.inf, 0.0)]) is None
