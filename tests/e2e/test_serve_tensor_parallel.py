"""`dsv4 serve --tensor-parallel 2` (and `--data-parallel 2`): the prefill and decode workers run as 2-rank gloo
groups on this machine; their greedy text equals `LLM.generate` in one process, and a follower rank that dies ends
its group (one log line naming it, the worker exits non-zero, serve stops with one line) instead of leaving a
half-alive group.

The workers run float64 (DSV4_DTYPE) as the reference does: two ranks sum partial attention and expert outputs in
another order than one process, and in fp32 that can flip a near-tie greedy token of the random model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from dsv4.model_runtime.chat_encoding import ChatEncoder
from dsv4.model_runtime.engine.llm import LLM
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.tokenizer import Tokenizer

from .test_serve import READY_TIMEOUT_S, Serve, alive, descendants

pytestmark = pytest.mark.e2e

PROMPTS = ["Tell me about Redis.", "What is two plus two?", "Write a haiku about tensor parallelism."]
MAX_TOKENS = 10
ENV = {"DSV4_DISAGGREGATION__MODE": "always", "DSV4_DTYPE": "float64"}  # prefill exports, decode imports: both TP2


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dsv4-home-tp")


@pytest.fixture
def serve_cleanup() -> Iterator[list[Serve]]:
    """Nothing a test started may outlive it, whatever failed."""
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None or descendants(s.proc.pid):
            s.kill_all()


def _ranks(serve: Serve, role: str) -> dict[int, int]:
    """The rank processes of `role`'s group under serve: {rank: pid}."""
    found = {}
    for pid in descendants(serve.proc.pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"dsv4.services.workers.group:rank_main" in cmdline and role.encode() in cmdline:
                environ = dict(
                    kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv
                )
                found[int(environ[b"RANK"])] = pid
    return found


async def _chat(client: openai.AsyncOpenAI, prompt: str) -> str:
    reply = await client.chat.completions.create(
        model="deepseek-v4-flash",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content or ""


async def _chats(url: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        return list(await asyncio.gather(*(_chat(client, p) for p in PROMPTS)))


@pytest.mark.parametrize(
    "layout",
    [["--tensor-parallel", "2"], ["--data-parallel", "2"], ["--data-parallel", "2", "--speculative-mtp"]],
    ids=["tp2", "dp2", "dp2-mtp"],
)
def test_two_rank_groups_greedy_text_equals_llm_generate(
    home: Path, serve_cleanup: list[Serve], layout: list[str]
) -> None:
    # dp2: data-parallel attention, each rank a group of its own sequences (the concurrent requests are shared out,
    # so the handoff exports from and imports into both), the experts split over the two. dp2-mtp: the same with MTP
    # speculative decoding (the blobs carry the MTP's state and draft; verification steps split between the groups).
    serve = Serve(home, *layout, "--broker", "redis-server", env=ENV)
    serve_cleanup.append(serve)
    serve.wait_for(r"starting gateway, prefill and decode \(2 ranks each\)")
    serve.wait_for(r"dsv4 serve: ready in [\d.]+ s at " + re.escape(serve.url) + "/v1")
    assert sorted(_ranks(serve, "prefill")) == sorted(_ranks(serve, "decode")) == [0, 1]

    texts = asyncio.run(_chats(serve.url))  # concurrently: the groups batch them

    model_dir = home / "models" / "tiny-flash"
    tokenizer = Tokenizer.from_pretrained(model_dir)
    encoder = ChatEncoder(tokenizer)
    prompts = [encoder.encode([{"role": "user", "content": p}]).token_ids for p in PROMPTS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = LLM(str(model_dir), dtype=torch.float64).generate(prompts, params)
    assert texts == [tokenizer.decode(e.token_ids) for e in expected]
    if "--speculative-mtp" in layout:  # the decode group verified drafts (the imported blobs' first among them)
        metrics = serve.wait_for(r"(http://127\.0\.0\.1:\d+/metrics) \(decode\)", timeout=5).group(1)
        drafts = [
            ln
            for ln in httpx.get(metrics, timeout=10).text.splitlines()
            if ln.startswith("dsv4_mtp_draft_tokens_total")
        ]
        assert drafts and float(drafts[0].rsplit(" ", 1)[1]) >= len(PROMPTS), drafts

    children = descendants(serve.proc.pid)
    assert serve.stop(signal.SIGTERM) == 0, serve.proc.stderr.read() if serve.proc.stderr else ""
    assert not [pid for pid in children if alive(pid)]
    log = (home / "logs" / f"serve-{serve.port}" / "decode.log").read_text()
    assert "rank 1: the leader stopped the group" in log  # followers end when their leader has drained


def test_a_killed_follower_ends_its_group_and_serve(home: Path, serve_cleanup: list[Serve]) -> None:
    serve = Serve(home, "--tensor-parallel", "2", "--broker", "redis-server", env=ENV)
    serve_cleanup.append(serve)
    serve.wait_for(r"dsv4 serve: ready in [\d.]+ s", timeout=READY_TIMEOUT_S)
    follower = _ranks(serve, "decode")[1]
    children = descendants(serve.proc.pid)

    async def stream_then_kill() -> None:
        async with openai.AsyncOpenAI(base_url=serve.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            stream = await c.chat.completions.create(
                model="deepseek-v4-flash",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=400,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            with contextlib.suppress(openai.OpenAIError):
                n = 0
                async for _ in stream:
                    n += 1
                    if n == 3:  # the decode group is streaming: its follower is inside the step loop
                        os.kill(follower, signal.SIGKILL)

    asyncio.run(stream_then_kill())
    assert serve.proc.wait(timeout=120) == 1
    assert serve.proc.stderr is not None
    err = serve.proc.stderr.read().strip()
    assert err.count("\n") == 0 and "the decode worker exited with status" in err, err
    log = (home / "logs" / f"serve-{serve.port}" / "decode.log").read_text()
    assert re.search(rf"rank 1 \(local rank 1, pid {follower}\) was killed by SIGKILL; stopping the group", log), log
    deadline = time.monotonic() + 30
    while [pid for pid in children if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], "a rank outlived its group"
