"""Real gateway processes, and the worker side of the queue protocol played by the test itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dsv4.model_runtime.engine.port import TokenLogprobs
from dsv4.protocol import contract, env, keys
from dsv4.protocol.connection import connect
from dsv4.services.local_redis import LocalRedis, free_port
from dsv4.services.token_stream import TokenWriter, Usage
from dsv4.services.work_queue import Delivery, Job, WorkQueue

DEPLOYMENT = "itest"
API_KEY = "sk-test-key"
MODEL = "deepseek-v4-flash"


class GatewayProcess:
    """`dsv4 gateway` in a subprocess on a free port; `stop()` sends SIGTERM and waits."""

    def __init__(self, redis_url: str, extra_env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="dsv4-gw-"))
        self.key_file = self._dir / "keys"
        self.key_file.write_text(f"# test keys\n{API_KEY}\n\nsk-second\n")
        self.log_path = self._dir / "gateway.log"
        self.env = {
            **os.environ,
            env.DEPLOYMENT: DEPLOYMENT,
            env.TOKEN_TIMEOUT_S: "3",
            env.QUEUE_STATS_TTL_S: "0",
            **(extra_env or {}),
        }
        self.redis_url = redis_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> GatewayProcess:
        args = [sys.executable, "-m", "dsv4.services.cli", "gateway", "--host", "127.0.0.1", "--port", str(self.port),
                "--redis-url", self.redis_url, "--api-key-file", str(self.key_file)]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + contract.HEALTH_PATH, timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway did not become healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def module_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(module_redis: LocalRedis) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(module_redis.url, {"DSV4_DISAGGREGATION__MIN_PROMPT_TOKENS": "64"}).start()
    yield gw
    gw.stop()


Responder = Callable[[Job, TokenWriter], Awaitable[None]]


@dataclass
class WorkerSide:
    """The worker end of the queue protocol, scripted by a test: reads jobs, writes tokens back."""

    redis_url: str
    streams: tuple[str, ...] = (keys.DECODE_STREAM, keys.PREFILL_STREAM)
    jobs: list[tuple[str, Job]] = field(default_factory=list)

    async def serve(self, respond: Responder) -> None:
        client = connect(self.redis_url)
        queues = [WorkQueue(client, DEPLOYMENT, s, consumer="test-worker") for s in self.streams]
        for q in queues:
            await q.ensure_group()
        try:
            while True:
                for q in queues:
                    deliveries: list[Delivery] = await q.read(count=8, block_ms=20)
                    for d in deliveries:
                        self.jobs.append((q.stream, d.job))
                        await respond(d.job, TokenWriter(client, DEPLOYMENT, d.job.request_id))
                        await q.ack(d)
        finally:
            await client.aclose()


@pytest.fixture
async def worker_side(module_redis: LocalRedis) -> AsyncIterator[Callable[[Responder], WorkerSide]]:
    """Start the scripted worker side with a responder; it stops when the test ends."""
    tasks: list[asyncio.Task[None]] = []

    def start(respond: Responder) -> WorkerSide:
        side = WorkerSide(module_redis.url)
        tasks.append(asyncio.create_task(side.serve(respond)))
        return side

    yield start
    for t in tasks:
        # A cancel that lands as a Redis socket timeout fires is absorbed by redis-py's retry: cancel until done.
        while not t.done():
            t.cancel()
            await asyncio.wait([t], timeout=1)


def fake_logprobs(index: int, token_id: int, k: int) -> TokenLogprobs:
    """Made-up but checkable logprobs of generated token `index`: the token itself is the best of k."""
    lp = -0.125 * (index + 1)
    return TokenLogprobs(lp, tuple((token_id + j, lp - j) for j in range(k)))


async def write_tokens(job: Job, writer: TokenWriter, ids: list[int], *, duplicate: bool = True) -> None:
    """Write `ids` (cut at max_tokens) one entry a token, each written twice when `duplicate`, then the end;
    with `fake_logprobs` when the job asks for logprobs."""
    ids = ids[: job.sampling.max_tokens]
    k = job.sampling.logprobs
    for i, t in enumerate(ids):
        logprobs = None if k is None else [fake_logprobs(i, t, k)]
        await writer.write(i, [t], logprobs)
        if duplicate:
            await writer.write(i, [t], logprobs)
    reason = "length" if len(ids) == job.sampling.max_tokens else "stop"
    await writer.finish(reason, Usage(len(job.prompt_ids), len(ids)))
