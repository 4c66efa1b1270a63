"""A prefill or decode worker of more than one rank: `dsv4 prefill|decode` starts one rank per device through the
rank launcher, rank 0 serves the role as a one-rank worker does and the other ranks follow its engine.

* Rank 0 (the leader) owns the engine's scheduler, KV pool, prefix cache and sampler (`parallel/engine_group.py`),
  and everything of the role: Redis, the handoff, KV events, /healthz, /readyz and /metrics on the worker port.
* A follower replays the leader's model calls on its shard. The first rank of a pod that holds no leader serves
  /healthz and /readyz on the worker port (ready once its shard is loaded), so that pod's probes work. Followers
  ignore SIGTERM: the leader drains its jobs, which needs them, and then stops them.
* All or nothing: a rank that dies ends the group (the launcher stops the others and exits non-zero), so the pod
  restarts and the jobs the group held are taken over by other workers once their leases lapse.

The group's size is WORLD_SIZE (the operator and `dsv4 serve` set it), which must equal the `parallelism`
settings' tensor x data: `data` tensor-parallel groups of `tensor` ranks (data-parallel attention, experts split
over all ranks when `expert` is set; `parallel/data_parallel.py`), except that with tensor 1, no expert parallelism
and one rank per pod each pod serves as a one-rank replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from dsv4.model_runtime.parallel.launch import GroupEnv, LaunchError, launch
from dsv4.protocol import contract, env
from dsv4.services.health import health_routes
from dsv4.services.workers.settings import WorkerSettings

if TYPE_CHECKING:  # the rank module imports torch; the command line's checks run without it
    from dsv4.model_runtime.parallel.rank import RankContext

log = logging.getLogger(__name__)

RANK_TARGET = "dsv4.services.workers.group:rank_main"
STOP_MARGIN_S = 15.0  # beyond the drain: the leader leaves the consumer group and stops its followers


class GroupConfigError(ValueError):
    """Group settings that cannot run; the message names the variable or setting."""


def group_world(settings: WorkerSettings, environ: Mapping[str, str]) -> int:
    """The ranks of this worker's group (1: a one-rank worker): WORLD_SIZE, or else parallelism tensor x data; 1 for
    pure data parallel (no expert parallelism) with one rank per pod. GroupConfigError when the two disagree."""
    p = settings.parallelism
    want = p.tensor * p.data
    raw = environ.get(env.WORLD_SIZE) or str(want)
    try:
        world = int(raw)
    except ValueError:
        raise GroupConfigError(f"{env.WORLD_SIZE}={raw!r}: not an integer") from None
    if world != want:
        raise GroupConfigError(
            f"{env.WORLD_SIZE}={world}, but the parallelism settings give tensor x data = {p.tensor} x {p.data} = "
            f"{want} ranks: set both for the same group"
        )
    if p.data > 1 and p.tensor == 1 and not p.expert and environ.get(env.NPROC_PER_NODE, "1") == "1":
        # Pure data parallel with one rank per pod (what the operator makes of a cpu pool of several pods): every
        # rank is a whole replica with nothing to share (no experts split), so this pod serves alone and the group
        # env only names its siblings.
        return 1
    return world


def run_group(role: contract.Role, settings: WorkerSettings, world: int) -> int:
    """Start this pod's ranks of the worker's `world`-rank group (launcher env: MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
    NODE_RANK, NPROC_PER_NODE) and wait for them; the group's exit status."""
    # Without the operator's rank env (a group set by the settings file alone) one pod holds the whole group.
    one_pod = None if os.environ.get(env.WORLD_SIZE) else world
    try:
        group = GroupEnv.from_env(world_size=one_pod, nproc_per_node=one_pod)
    except LaunchError as e:
        raise GroupConfigError(str(e)) from None
    # The ranks read the same settings; the command line's overrides reach them as the variables they override.
    overrides = {env.MODEL: str(settings.model), env.REDIS_URL: settings.redis_url}
    if settings.device:
        overrides[env.DEVICE] = settings.device
    device = (settings.device or "cpu").split(":")[0]
    log.info("%s worker: %d ranks on %s (%d on this pod)", role.value, group.world_size, device, group.nproc_per_node)
    grace = settings.drain_timeout_s + STOP_MARGIN_S
    return launch(RANK_TARGET, [role.value], group, device, extra_env=overrides, grace_s=grace)


def follower_app(rank: int, ready: threading.Event) -> FastAPI:
    """The HTTP side of a pod's first follower: /healthz, and /readyz once its shard is loaded."""
    app = FastAPI(title=f"dsv4 worker rank {rank}", docs_url=None, redoc_url=None, openapi_url=None)

    async def readiness() -> tuple[bool, dict[str, Any]]:
        if not ready.is_set():
            return False, {"status": "starting", "rank": rank}
        return True, {"status": "ready", "rank": rank}

    app.include_router(health_routes(readiness))
    return app


def _serve_follower_http(settings: WorkerSettings, rank: int, ready: threading.Event) -> None:
    import uvicorn

    from dsv4.services.workers.runtime import QuietServer

    config = uvicorn.Config(follower_app(rank, ready), host=settings.host, port=settings.port, log_level="warning")
    threading.Thread(target=QuietServer(config).run, name="dsv4-follower-http", daemon=True).start()


def rank_main(ctx: RankContext, args: list[str]) -> int:
    """One rank of the worker's group (the launcher's target; args: the role)."""
    role = contract.Role(args[0])
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s {role.value} rank {ctx.rank} %(name)s: %(message)s"
    )
    settings = WorkerSettings()
    import torch

    from dsv4.model_runtime.parallel.engine_group import load_rank_engine
    from dsv4.model_runtime.placement import Layout

    p = settings.parallelism
    layout = Layout.from_parallelism(p.tensor, p.data, p.expert)
    ready = threading.Event()
    if not ctx.is_leader:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if ctx.local_rank == 0:  # a pod without the leader: its probes reach this rank
            _serve_follower_http(settings, ctx.rank, ready)
    assert settings.model is not None
    dtype = getattr(torch, settings.compute_dtype())
    config = settings.engine_config()
    part = load_rank_engine(ctx, settings.model, layout, dtype=dtype, config=config)
    if not ctx.is_leader:
        ready.set()
        part.follow()
        log.info("rank %d: the leader stopped the group", ctx.rank)
        return 0
    from dsv4.model_runtime.engine.async_engine import AsyncEngine
    from dsv4.services import telemetry
    from dsv4.services.workers.main import serve_role, warmed_up

    telemetry.setup_tracing(role.value)
    engine = AsyncEngine(warmed_up(part.engine), kv_chunk_size=settings.kv_handoff.chunk_bytes)
    try:
        asyncio.run(serve_role(role, settings, engine))
    finally:
        engine.close()
        part.stop()
        telemetry.shutdown_tracing()
    return 0
