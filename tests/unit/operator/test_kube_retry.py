"""Conflicts and server errors are retried; other API errors surface at once."""

from __future__ import annotations

import pytest
from kubernetes.client import ApiException

from dsv4.operator import kube

pytestmark = pytest.mark.unit


def _flaky(statuses: list[int]):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if statuses:
            raise ApiException(status=statuses.pop(0))
        return "ok"

    return call, calls


def test_conflicts_and_5xx_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_S", 0.0)
    call, calls = _flaky([409, 503, 429])
    assert kube.retrying(call) == "ok" and calls["n"] == 4


def test_forbidden_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_S", 0.0)
    call, calls = _flaky([403])
    with pytest.raises(ApiException):
        kube.retrying(call)
    assert calls["n"] == 1


def test_gives_up_after_the_last_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube, "BACKOFF_S", 0.0)
    call, calls = _flaky([409] * 10)
    with pytest.raises(ApiException):
        kube.retrying(call, attempts=3)
    assert calls["n"] == 3
