"""`dsv4 prefill` and `dsv4 decode`: load the engine, then serve the role until SIGTERM has drained it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from dsv4.model_runtime.engine.port import Engine
from dsv4.protocol import contract, env, keys
from dsv4.services import telemetry
from dsv4.services.workers.settings import WorkerSettings

if TYPE_CHECKING:  # the engine imports torch; the command line's help and errors run without it
    from dsv4.model_runtime.engine.llm_engine import LLMEngine


def run_prefill(args: argparse.Namespace) -> int:
    """Entry point of `dsv4 prefill`."""
    return _run(args, contract.Role.PREFILL)


def run_decode(args: argparse.Namespace) -> int:
    """Entry point of `dsv4 decode`."""
    return _run(args, contract.Role.DECODE)


def _run(args: argparse.Namespace, role: contract.Role) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {role.value} %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    for name in ("model", "redis_url", "device"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    settings = WorkerSettings(**overrides)
    if settings.model is None:
        print(f"dsv4 {role.value}: no model: pass --model PATH or set {env.MODEL}", file=sys.stderr)
        return 2
    from dsv4.services.workers.group import GroupConfigError, group_world, run_group

    try:
        world = group_world(settings, os.environ)
        if world > 1:
            return run_group(role, settings, world)
    except GroupConfigError as e:
        print(f"dsv4 {role.value}: {e}", file=sys.stderr)
        return 2
    telemetry.setup_tracing(role.value)
    import torch  # imported only here, so the CLI's help and errors stay fast

    from dsv4.model_runtime.engine.async_engine import AsyncEngine
    from dsv4.model_runtime.engine.llm_engine import LLMEngine

    dtype = getattr(torch, settings.compute_dtype())
    config = settings.engine_config()
    # The export's chunks are the handoff's values as they come (one checksummed cut, not two): the size is the
    # handoff's.
    llm = LLMEngine.from_path(settings.model, device=settings.device or "cpu", dtype=dtype, config=config)
    engine = AsyncEngine(warmed_up(llm), kv_chunk_size=settings.kv_handoff.chunk_bytes)
    try:
        asyncio.run(serve_role(role, settings, engine))
    finally:
        engine.close()
        telemetry.shutdown_tracing()
    return 0


def warmed_up(llm: LLMEngine) -> LLMEngine:
    """`llm` after its warm-up request (logged with its seconds). Called before the runtime starts, so /readyz turns
    200 only once the first step's lazy work (kernel compiles, graph capture, allocator growth) is done and no
    client's first request pays for it; in a group the followers replay the warm-up too."""
    logging.getLogger("dsv4.worker").info("warm-up step took %.2f s", llm.warm_up())
    return llm


async def serve_role(role: contract.Role, settings: WorkerSettings, engine: Engine) -> None:
    """Serve the role from `engine` until SIGTERM has drained it (a one-rank worker, or a group's leader)."""
    from dsv4.services.workers.decode import DecodeWorker
    from dsv4.services.workers.prefill import PrefillWorker
    from dsv4.services.workers.runtime import WorkerRuntime, serve_worker

    stream = keys.PREFILL_STREAM if role is contract.Role.PREFILL else keys.DECODE_STREAM
    runtime = WorkerRuntime(role, settings, engine, stream)
    worker = PrefillWorker(runtime) if role is contract.Role.PREFILL else DecodeWorker(runtime)
    await serve_worker(runtime, worker.handle)
