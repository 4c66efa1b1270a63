"""A decode worker that is a 2-rank group loses a follower mid-stream: the group ends (the launcher's one line, a
non-zero exit) and the other decode worker (one rank) takes its jobs over, so every request completes with the
tokens a one-process engine gives. Gateway, prefill and both decode workers are real processes on a real
redis-server; the workers run float64, as the reference does (see test_serve_tensor_parallel.py).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from dsv4.model_runtime.engine.llm import LLM
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services.local_redis import LocalRedis, free_port

from .processes import RoleGroup, RoleProcess
from .streams import completions_killed_midway
from .test_serve import descendants

pytestmark = pytest.mark.e2e

KEY = "sk-e2e"
MODEL = "deepseek-v4-flash"
MAX_TOKENS = 40


class Pool(RoleGroup):
    def __init__(self, checkpoint: Path, redis_url: str) -> None:
        env = {
            "DSV4_DEPLOYMENT": "e2e-group",
            "DSV4_MODEL": str(checkpoint),
            "DSV4_REDIS_URL": redis_url,
            "DSV4_API_KEYS": KEY,
            "DSV4_DISAGGREGATION__MODE": "always",
            "DSV4_DTYPE": "float64",
            "DSV4_RECLAIM_IDLE_MS": "1500",
            "DSV4_HEARTBEAT_S": "0.3",
            "DSV4_TOKEN_TIMEOUT_S": "60",
            "OMP_NUM_THREADS": "1",
        }
        group = {
            "WORLD_SIZE": "2",
            "NPROC_PER_NODE": "2",
            "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "DSV4_PARALLELISM__TENSOR": "2",
        }
        self.gateway = RoleProcess("gateway", [], env)
        self.prefill = RoleProcess("prefill", [], env)
        self.group = RoleProcess("decode", [], env | group)
        self.single = RoleProcess("decode", [], env)

    def all(self) -> list[RoleProcess]:
        return [self.gateway, self.prefill, self.group, self.single]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("e2e-group") / "tiny-flash", "tiny-flash", quantized=True, seed=0)


@pytest.fixture(scope="module")
def pool(checkpoint: Path) -> Iterator[Pool]:
    with LocalRedis() as redis_server:
        p = Pool(checkpoint, redis_server.url)
        p.start()
        try:
            yield p
        finally:
            p.stop()


def _follower(worker: RoleProcess) -> int:
    """The pid of rank 1 of the worker's group."""
    assert worker.proc is not None
    for pid in descendants(worker.proc.pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"RANK=1" in environ:
            return pid
    raise AssertionError(f"no rank 1 under {worker.proc.pid}")


async def test_killed_follower_ends_its_group_and_the_other_worker_finishes_its_requests(
    pool: Pool, checkpoint: Path
) -> None:
    prompts = [[(37 * k + 11 * i) % 120000 + 100 for k in range(10 + i)] for i in range(8)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(checkpoint), dtype=torch.float64).generate(prompts, params)]
    tok = Tokenizer.from_pretrained(checkpoint)
    follower = _follower(pool.group)

    async def kill() -> None:
        os.kill(follower, signal.SIGKILL)

    async with openai.AsyncOpenAI(base_url=pool.gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        texts = await completions_killed_midway(
            c, MODEL, prompts, MAX_TOKENS, kill, started_timeout=180, done_timeout=240
        )
    for i, text in enumerate(texts):
        assert text == tok.decode(expected[i], skip_special_tokens=True), f"request {i}"
    assert pool.group.proc is not None
    assert pool.group.proc.wait(timeout=60) != 0
    log = pool.group.log_tail(400)
    assert re.search(rf"rank 1 \(local rank 1, pid {follower}\) was killed by SIGKILL; stopping the group", log), log
    single_log = pool.single.log_tail(400)
    assert "took over job" in single_log, single_log
