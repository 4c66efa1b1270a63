"""What the CRD's schema and CEL rules cannot check: it becomes the Degraded condition, never a crash loop."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from dsv4.model_runtime.config import ModelConfig
from dsv4.model_runtime.placement import PlacementError
from dsv4.model_runtime.plan import ACCELERATORS, Plan, PlanError, plan
from dsv4.model_runtime.presets import published_config
from dsv4.operator.profiles import devices_per_pod
from dsv4.operator.spec import DeploymentSpec, PoolSpec, parse_spec
from dsv4.operator.status import Problem

# Devices on one node of each product: a pod asking for more can never be scheduled.
DEVICES_PER_NODE = {"nvidia": 8, "ascend": 16}


def parse(raw: Mapping[str, Any]) -> tuple[DeploymentSpec | None, list[Problem]]:
    """The typed spec, or the reasons it cannot be read (e.g. a CRD older than the operator)."""
    try:
        return parse_spec(dict(raw)), []
    except ValidationError as err:
        details = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return None, [Problem("InvalidSpec", details)]


def ratio_feasible(spec: DeploymentSpec) -> bool:
    """Whether some prefill and decode counts within their bounds meet the planner's ratio bounds."""
    a = spec.autoscaling
    for d in range(max(spec.decode.min_replicas, 1), spec.decode.max_replicas + 1):
        lo = max(spec.prefill.min_replicas, math.ceil(a.min_prefill_decode_ratio * d - 1e-9))
        hi = min(spec.prefill.max_replicas, math.floor(a.max_prefill_decode_ratio * d + 1e-9))
        if lo <= hi:
            return True
    return False


def spec_problems(spec: DeploymentSpec) -> list[Problem]:
    """Problems visible from the spec alone."""
    problems: list[Problem] = []
    if spec.autoscaling.enabled and spec.disaggregation.mode != "never" and not ratio_feasible(spec):
        problems.append(
            Problem(
                "RatioInfeasible",
                "no prefill and decode replica counts within their min/max bounds meet autoscaling "
                f"prefill:decode ratio bounds [{spec.autoscaling.min_prefill_decode_ratio}, "
                f"{spec.autoscaling.max_prefill_decode_ratio}]",
            )
        )
    problems += device_problems(spec)
    problems += fit_problems(spec)
    return problems


def device_problems(spec: DeploymentSpec) -> list[Problem]:
    """Pods that ask for more devices than one node has: they would stay Pending forever."""
    problems: list[Problem] = []
    limit = DEVICES_PER_NODE.get(spec.accelerator.type)
    for pool_name, pool in (("prefill", spec.prefill), ("decode", spec.decode)):
        n = devices_per_pod(spec.accelerator, pool)
        if limit is not None and n > limit:
            problems.append(
                Problem(
                    "Unschedulable",
                    f"{pool_name} pods need {n} {spec.accelerator.type} devices but one node has at most {limit}: "
                    f"spread each replica over more pods with {pool_name}.podsPerReplica",
                )
            )
    return problems


def reference_problems(spec: DeploymentSpec, secret_has_key: Callable[[str, str], bool | None]) -> list[Problem]:
    """Problems with objects the spec refers to. `secret_has_key(name, key)` is None when the Secret is missing."""
    problems: list[Problem] = []
    refs = [("auth.apiKeySecretRef", spec.auth.api_key_secret_ref), ("redis.secretRef", spec.redis.secret_ref)]
    for where, ref in refs:
        if ref is None:
            continue
        found = secret_has_key(ref.name, ref.key)
        if found is None:
            problems.append(Problem("SecretNotFound", f"{where}: Secret {ref.name!r} does not exist"))
        elif not found:
            problems.append(Problem("SecretKeyNotFound", f"{where}: Secret {ref.name!r} has no key {ref.key!r}"))
    return problems


def fit_problems(spec: DeploymentSpec) -> list[Problem]:
    """Pools whose layout cannot hold the model (`dsv4 plan`'s arithmetic, the same function): Ready=False with the
    shortfall, rather than pods that run out of memory while loading.

    Checked where the shapes and the device are known: the published Flash and Pro on a product of `dsv4 plan`'s
    accelerator table. A custom checkpoint's shapes are only known inside the pods (the runtime refuses it there).
    """
    product = (spec.accelerator.product or "").lower()
    if spec.model.variant not in ("flash", "pro") or product not in ACCELERATORS:
        return []
    problems: list[Problem] = []
    for name, pool in (("prefill", spec.prefill), ("decode", spec.decode)):
        if pool.max_replicas == 0:
            continue
        try:
            verdict = _plan(spec.model.variant, product, *_layout(spec, pool))
        except (PlanError, PlacementError) as e:
            problems.append(Problem("DoesNotFit", f"{name}: the layout cannot split the model: {e}"))
            continue
        if not verdict.fits:
            problems.append(Problem("DoesNotFit", f"{name}: {verdict.message}"))
    return problems


def _layout(spec: DeploymentSpec, pool: PoolSpec) -> tuple[int, int, int, int, bool]:
    par = pool.parallelism
    return devices_per_pod(spec.accelerator, pool), pool.pods_per_replica, par.tensor, par.data, par.expert


@functools.lru_cache(maxsize=256)
def _plan(variant: str, accelerator: str, devices: int, pods: int, tensor: int, data: int, expert: bool) -> Plan:
    # Pure and a few hundred milliseconds for Pro: every reconcile of every resource would otherwise pay it.
    cfg = ModelConfig.from_dict(published_config(variant))
    return plan(cfg, accelerator, devices, pods, tensor, data, expert, model=f"DeepSeek-V4-{variant.capitalize()}")
