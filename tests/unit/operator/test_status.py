"""Observed children → phase, conditions with reasons, per-pool replicas; and the operator-only spec checks."""

from __future__ import annotations

from typing import Any

import pytest

from dsv4.operator import checks
from dsv4.operator.status import Problem, Workload, compute_status, pool_of_groups, read_workload, ready_pods

from .conftest import Admit

pytestmark = pytest.mark.unit

NOW = "2026-11-29T03:00:00Z"
TINY = {"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}}


def _w(desired: int, ready: int, *, updated: int | None = None, current: bool = True, failure: str | None = None):
    return Workload(desired, ready, desired if updated is None else updated, current, failure)


def _status(workloads: dict[str, Workload | None], problems: list[Problem] | None = None, previous=()):
    return compute_status(
        generation=3,
        workloads=workloads,
        problems=problems or [],
        endpoint="http://x",
        now=NOW,
        previous_conditions=previous,
    )


def _cond(status: Any, type_: str) -> tuple[str, str]:
    c = next(c for c in status.conditions if c.type == type_)
    return c.status, c.reason


def test_all_ready() -> None:
    s = _status({"gateway": _w(1, 1), "prefill": _w(2, 2), "decode": _w(3, 3), "redis": _w(1, 1)})
    assert s.phase == "Ready" and s.observed_generation == 3 and s.redis_ready
    assert _cond(s, "Ready") == ("True", "AllPoolsReady")
    assert _cond(s, "Progressing") == ("False", "Stable")
    assert _cond(s, "Degraded") == ("False", "AsExpected")
    assert s.prefill is not None and s.prefill.summary == "2/2"


def test_nothing_created_yet_is_pending() -> None:
    s = _status({"gateway": None, "prefill": None, "decode": None})
    assert s.phase == "Pending"
    assert _cond(s, "Progressing") == ("True", "Creating")
    assert _cond(s, "Ready") == ("False", "PodsNotReady")


def test_partly_ready_is_progressing() -> None:
    s = _status({"gateway": _w(1, 1), "prefill": _w(2, 1), "decode": _w(1, 0)})
    assert s.phase == "Progressing"
    status, reason = _cond(s, "Ready")
    assert (status, reason) == ("False", "PodsNotReady")
    assert "decode" in s.conditions[0].message and "prefill" in s.conditions[0].message


def test_rollout_in_progress() -> None:
    s = _status({"gateway": _w(1, 1), "prefill": _w(2, 2, updated=1), "decode": _w(1, 1, current=False)})
    assert _cond(s, "Progressing") == ("True", "RollingOut")
    assert s.phase == "Ready"  # serving on the old pods while the new ones roll


def test_problems_make_it_degraded_and_not_ready() -> None:
    s = _status({"gateway": _w(1, 1), "prefill": _w(1, 1), "decode": _w(1, 1)}, [Problem("SecretNotFound", "nope")])
    assert s.phase == "Degraded"
    assert _cond(s, "Degraded") == ("True", "SecretNotFound")
    assert _cond(s, "Ready") == ("False", "InvalidSpec")


def test_workload_failure_is_degraded() -> None:
    s = _status({"gateway": _w(1, 1), "prefill": _w(1, 0, failure="FailedCreate: quota"), "decode": _w(1, 1)})
    assert _cond(s, "Degraded") == ("True", "WorkloadFailure") and "quota" in s.conditions[2].message


def test_transition_time_is_kept_while_the_status_holds() -> None:
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    s = _status({"gateway": _w(1, 1), "prefill": _w(1, 1), "decode": _w(1, 1)}, previous=previous)
    assert s.conditions[0].last_transition_time == "2026-01-01T00:00:00Z"
    s = _status({"gateway": _w(1, 0), "prefill": _w(1, 1), "decode": _w(1, 1)}, previous=previous)
    assert s.conditions[0].last_transition_time == NOW


def test_read_workload_from_api_objects() -> None:
    obj = {
        "metadata": {"generation": 4},
        "spec": {"replicas": 3},
        "status": {
            "observedGeneration": 4,
            "readyReplicas": 2,
            "updatedReplicas": 3,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
        },
    }
    w = read_workload(obj)
    assert (w.desired, w.ready, w.updated, w.up_to_date) == (3, 2, 3, True)
    assert w.failure is not None and w.failure.startswith("ProgressDeadlineExceeded")
    fresh = read_workload({"metadata": {"generation": 1}, "spec": {"replicas": 1}})
    assert (fresh.ready, fresh.up_to_date, fresh.failure) == (0, False, None)


def test_ratio_infeasible_is_a_problem(admit: Admit) -> None:
    spec = admit(
        {
            **TINY,
            "prefill": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1},
            "decode": {"replicas": 4, "minReplicas": 4, "maxReplicas": 4},
            "autoscaling": {"enabled": True, "minPrefillDecodeRatio": 0.5, "maxPrefillDecodeRatio": 1},
        }
    )
    assert [p.reason for p in checks.spec_problems(spec)] == ["RatioInfeasible"]
    assert checks.ratio_feasible(
        spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={"min_prefill_decode_ratio": 0.25})})
    )


def test_too_many_devices_for_one_node(admit: Admit) -> None:
    spec = admit(
        {
            "model": {"variant": "flash", "source": {"hostPath": "/m"}},
            "accelerator": {"type": "nvidia"},
            "decode": {"parallelism": {"tensor": 16}},
        }
    )
    [problem] = checks.spec_problems(spec)
    assert problem.reason == "Unschedulable" and "decode pods need 16 nvidia devices" in problem.message


def test_valid_spec_has_no_problems(admit: Admit) -> None:
    assert checks.spec_problems(admit(TINY)) == []


def test_missing_secrets_and_keys(admit: Admit) -> None:
    spec = admit(
        {
            **TINY,
            "auth": {"apiKeySecretRef": {"name": "keys", "key": "k"}},
            "redis": {"managed": False, "url": "redis://r:6379", "secretRef": {"name": "pw"}},
        }
    )
    secrets = {"keys": {"other"}}
    problems = checks.reference_problems(spec, lambda n, k: None if n not in secrets else k in secrets[n])
    assert [p.reason for p in problems] == ["SecretKeyNotFound", "SecretNotFound"]
    assert "auth.apiKeySecretRef" in problems[0].message


def test_unreadable_spec_is_a_problem_not_a_crash() -> None:
    spec, problems = checks.parse({"model": {"variant": "tiny"}, "accelerator": {"type": "cpu"}, "bogus": 1})
    assert spec is None and problems[0].reason == "InvalidSpec" and "spec.bogus" in problems[0].message


def _pod(component: str, ready: bool, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {"app.kubernetes.io/component": component}}
    if deleting:
        meta["deletionTimestamp"] = NOW
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_ready_pods_counts_ready_pods_that_stay() -> None:
    pods = [_pod("decode", True), _pod("decode", True, deleting=True), _pod("decode", False), _pod("gateway", True)]
    assert ready_pods(pods) == {"decode": 1, "gateway": 1}


def test_pods_cover_a_lagging_workload_controller() -> None:
    deployment = {"metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1}}
    assert read_workload(deployment, ready_pods=2).ready == 2  # the Deployment's status still says 0
    assert read_workload(deployment, ready_pods=3).ready == 2  # surge pods during a rollout do not count twice
    lagging_pods = {**deployment, "status": {"observedGeneration": 1, "readyReplicas": 2}}
    assert read_workload(lagging_pods, ready_pods=0).ready == 2


def test_groups_ready_counts_whole_groups() -> None:
    # The StatefulSet fallback: one StatefulSet per group, each counting its pods.
    groups = [_w(2, 2), _w(2, 1), _w(2, 0, updated=1)]
    pool = pool_of_groups(groups, desired=3, ready_groups=1, size=2)
    assert (pool.desired, pool.ready, pool.updated, pool.pods_per_group) == (3, 1, 2, 2)
    s = _status({"gateway": _w(1, 1), "prefill": _w(1, 1), "decode": pool})
    assert s.decode is not None and s.decode.summary == "1/3" and s.decode.pods_per_group == 2
    assert s.phase == "Progressing" and _cond(s, "Ready") == ("False", "PodsNotReady")
    # Pods Ready before the controllers say so: the pods win, never beyond the desired groups.
    assert pool_of_groups([_w(2, 0), _w(2, 0)], desired=2, ready_groups=5, size=2).ready == 2
    failing = pool_of_groups([_w(2, 0, failure="FailedCreate: quota")], desired=1, ready_groups=0, size=2)
    assert failing.failure == "FailedCreate: quota"


def test_leader_worker_set_counts_groups() -> None:
    lws = {
        "metadata": {"generation": 4},
        "spec": {"replicas": 2},
        "status": {"readyReplicas": 1, "updatedReplicas": 2, "observedGeneration": 4},
    }
    w = read_workload(lws)
    assert (w.desired, w.ready, w.updated, w.up_to_date) == (2, 1, 2, True)
