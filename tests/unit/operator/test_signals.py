"""Latency signals from Prometheus expositions as the services write them."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dsv4.operator import planner, signals
from dsv4.protocol import contract

pytestmark = pytest.mark.unit


def _exposition(values: list[float]) -> str:
    registry = CollectorRegistry()
    h = Histogram(contract.METRIC_TTFT, "ttft", buckets=(0.1, 0.5, 1.0, 2.0), registry=registry)
    for v in values:
        h.observe(v)
    return generate_latest(registry).decode()


def test_buckets_are_summed_over_pods() -> None:
    total = signals.sum_buckets([_exposition([0.05, 0.7]), _exposition([0.3])], contract.METRIC_TTFT)
    assert total == {0.1: 1.0, 0.5: 2.0, 1.0: 3.0, 2.0: 3.0, math.inf: 3.0}
    assert signals.sum_buckets([_exposition([0.3])], contract.METRIC_ITL) is None


def test_quantile_over_the_interval_between_scrapes() -> None:
    first = signals.sum_buckets([_exposition([0.05] * 100)], contract.METRIC_TTFT)
    second = signals.sum_buckets([_exposition([0.05] * 100 + [1.5] * 100)], contract.METRIC_TTFT)
    assert first is not None and second is not None
    assert signals.interval_buckets(first, None) == []
    p95 = planner.histogram_quantile(0.95, signals.interval_buckets(second, first))
    assert p95 is not None and 1.0 < p95 <= 2.0  # only the slow requests of the last interval count


def test_counter_reset_uses_the_new_scrape() -> None:
    before = {0.1: 50.0, math.inf: 50.0}
    now = {0.1: 2.0, math.inf: 4.0}
    assert signals.interval_buckets(now, before) == [(0.1, 2.0), (math.inf, 4.0)]


async def test_unreachable_pods_give_no_text() -> None:
    assert await signals.scrape(["http://127.0.0.1:9/metrics"]) == []
