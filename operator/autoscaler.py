"""The planner's I/O: read the signals, ask `planner.plan`, drain, resize, remember, and record an Event.

A resize is a patch of `spec.<pool>.replicas` (groups) on the DeepSeekV4Deployment itself, so the reconciler applies
it like any spec change and `kubectl get dsv4 -o yaml` shows what the planner chose. Before a scale-down of a pool of
single-pod replicas the pods with the least pending work get a low `controller.kubernetes.io/pod-deletion-cost`, so
the ReplicaSet removes them first; their SIGTERM makes the services stop taking work and finish what they hold (the
services' drain). Multi-pod groups go whole, highest index first.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kopf
import redis.asyncio as aioredis

from dsv4.operator import checks, planner, redis_children, signals
from dsv4.operator.kube import TIMEOUT, Kube
from dsv4.operator.ownership import Owner
from dsv4.operator.reconcile import Post, now_iso
from dsv4.operator.spec import DeploymentSpec, PoolSpec
from dsv4.protocol import contract, keys
from dsv4.protocol.connection import RedisUnavailable

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_COST = "-1000"
REDIS_TIMEOUT_S = 3.0


def _since(status: Mapping[str, Any], pool: str, now: dt.datetime) -> float | None:
    stamp = ((status.get("planner") or {}).get(pool) or {}).get("lastScaleTime")
    if not stamp:
        return None
    return (now - dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)).total_seconds()


def pool_input(
    pool: PoolSpec, backlog: int, latency_ms: float | None, target_ms: float, since: float | None
) -> planner.PoolInput:
    """The planner's view of one pool."""
    return planner.PoolInput(
        replicas=pool.replicas,
        min_replicas=pool.min_replicas,
        max_replicas=pool.max_replicas,
        backlog=backlog,
        latency_ms=latency_ms,
        latency_target_ms=target_ms,
        seconds_since_scale=since,
    )


def policy(spec: DeploymentSpec) -> planner.Policy:
    """The planner's knobs from the spec."""
    a = spec.autoscaling
    return planner.Policy(
        queue_per_replica=a.target_queue_per_replica,
        min_ratio=a.min_prefill_decode_ratio,
        max_ratio=a.max_prefill_decode_ratio,
        up_cooldown_s=a.scale_up_cooldown_seconds,
        down_cooldown_s=a.scale_down_cooldown_seconds,
        scale_prefill=spec.disaggregation.mode != "never",
    )


def redis_url(kube: Kube, owner: Owner, spec: DeploymentSpec) -> str:
    """The deployment's Redis URL, with the password of `spec.redis.secretRef` in it when set."""
    url = redis_children.redis_url(owner, spec)
    ref = spec.redis.secret_ref
    if ref is None:
        return url
    secret = kube.core.read_namespaced_secret(ref.name, owner.namespace, _request_timeout=TIMEOUT)
    password = base64.b64decode((secret.data or {})[ref.key]).decode()
    parts = urlsplit(url)
    netloc = f":{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def _latencies(kube: Kube, owner: Owner, memo: MutableMapping[str, Any]) -> dict[str, float | None]:
    """p95 TTFT and ITL in ms over the last interval, from the gateway pods' /metrics."""
    pods = await asyncio.to_thread(kube.pods, owner.namespace, owner.name, contract.Role.GATEWAY.value)
    urls = [
        f"http://{p.status.pod_ip}:{contract.GATEWAY_PORT}{contract.METRICS_PATH}"
        for p in pods
        if p.status and p.status.pod_ip
    ]
    texts = await signals.scrape(urls) if urls else []
    out: dict[str, float | None] = {}
    for pool, metric in (("prefill", contract.METRIC_TTFT), ("decode", contract.METRIC_ITL)):
        now = signals.sum_buckets(texts, metric)
        before = memo.get(f"buckets-{pool}")
        memo[f"buckets-{pool}"] = now
        q = planner.histogram_quantile(0.95, signals.interval_buckets(now, before)) if now else None
        out[pool] = None if q is None else q * 1000
    return out


async def decide(
    kube: Kube, body: Mapping[str, Any], spec: DeploymentSpec, memo: MutableMapping[str, Any]
) -> tuple[tuple[planner.Decision, planner.Decision], dict[str, signals.QueueSignal]]:
    """Read every signal and return the planner's decisions with the queue signals they came from."""
    meta = body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    url = await asyncio.to_thread(redis_url, kube, owner, spec)
    client = aioredis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        queues = {
            "prefill": await signals.queue_signal(client, owner.name, keys.PREFILL_STREAM),
            "decode": await signals.queue_signal(client, owner.name, keys.DECODE_STREAM),
        }
    finally:
        await client.aclose()
    latency = await _latencies(kube, owner, memo)
    now = dt.datetime.now(dt.UTC)
    status = body.get("status") or {}
    a = spec.autoscaling
    decisions = planner.plan(
        pool_input(
            spec.prefill,
            queues["prefill"].backlog,
            latency["prefill"],
            a.ttft_target_ms,
            _since(status, "prefill", now),
        ),
        pool_input(
            spec.decode, queues["decode"].backlog, latency["decode"], a.itl_target_ms, _since(status, "decode", now)
        ),
        policy(spec),
    )
    return decisions, queues


def apply_decision(
    kube: Kube,
    owner: Owner,
    decision: planner.Decision,
    queue: signals.QueueSignal,
    post: Post,
    pods_per_replica: int = 1,
) -> None:
    """Drain (mark) the victims of a scale-down, resize the pool in the spec, remember when, and say why.

    A pool of multi-pod groups loses its highest-numbered groups whole (LeaderWorkerSet and the StatefulSet fallback
    both number them); their pods drain on SIGTERM for the pool's `drainSeconds`.
    """
    if decision.desired < decision.current and pods_per_replica > 1:
        going = ", ".join(str(g) for g in range(decision.desired, decision.current))
        post("Normal", "Draining", f"{decision.pool} groups {going} drain and go ({pods_per_replica} pods each)")
    elif decision.desired < decision.current:
        pods = kube.pods(owner.namespace, owner.name, decision.pool)
        candidates = [
            (
                p.metadata.name,
                any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or [])),
                queue.pending_by_consumer.get(p.metadata.name, 0),
            )
            for p in pods
            if p.metadata.deletion_timestamp is None
        ]
        for victim in planner.pick_drain_victims(candidates, decision.current - decision.desired):
            kube.annotate_pod(owner.namespace, victim, {DELETION_COST: DRAIN_COST})
            post("Normal", "Draining", f"{decision.pool} pod {victim} drains first (pod-deletion-cost)")
    kube.patch_spec(owner.namespace, owner.name, {decision.pool: {"replicas": decision.desired}})
    kube.patch_status(
        owner.namespace,
        owner.name,
        {"planner": {decision.pool: {"lastScaleTime": now_iso(), "lastDecision": decision.reason[:500]}}},
    )
    verb = "ScaledUp" if decision.desired > decision.current else "ScaledDown"
    post("Normal", verb, f"{decision.pool} {decision.current} -> {decision.desired}: {decision.reason}")


async def maybe_plan(
    kube: Kube, body: Mapping[str, Any], memo: MutableMapping[str, Any], post: Post, logger: kopf.Logger
) -> list[planner.Decision]:
    """Run the planner if autoscaling is on and its interval has passed; returns the decisions it made."""
    spec, problems = checks.parse(body.get("spec") or {})
    if spec is None or problems or not spec.autoscaling.enabled:
        return []
    now = time.monotonic()
    if now - memo.get("planned", -1e18) < spec.autoscaling.interval_seconds:
        return []
    memo["planned"] = now
    meta = body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    try:
        decisions, queues = await decide(kube, body, spec, memo)
    except (OSError, aioredis.RedisError, RedisUnavailable) as err:
        post("Warning", "PlannerNoSignal", f"cannot read the queues from Redis: {err}")
        return []
    for d in decisions:
        if d.changed:
            pool = spec.prefill if d.pool == "prefill" else spec.decode
            await asyncio.to_thread(apply_decision, kube, owner, d, queues[d.pool], post, pool.pods_per_replica)
        elif d.reason.startswith("hold"):
            post("Normal", "PlannerHold", f"{d.pool} stays at {d.current}: {d.reason}")
        logger.debug("planner %s: %s -> %s (%s)", d.pool, d.current, d.desired, d.reason)
    return list(decisions)
