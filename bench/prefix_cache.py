"""Prefix caching on `dsv4 serve --prefill-workers 2`: TTFT p50/p95 and the prefill tokens the engines computed, with
the cache on and off (`--no-prefix-cache`) in the same run, on the same checkpoint and prompts.

Workloads (streamed `/v1/completions` of token ids, greedy, EOS ignored, every prompt prefilled by the prefill pool:
`DSV4_DISAGGREGATION__MODE=always`):

* `shared`: `--requests` (32) prompts of a `--prefix` (2048)-token shared prefix and `--unique` (64) tokens each; the
  first alone, then the others with `--concurrency` in flight (TTFT counts all of them); `--cold`: all of them with
  `--concurrency` in flight from the start.
* `chat`: `--chats` conversations of `--turns` (4) turns: turn 1 = a `--system`-token system prompt shared by all and a
  `--message`-token user message; turn k+1 = turn k's prompt, an answer of `--answer` tokens and a new message (the
  answer in the history is synthetic: which tokens it holds does not change what is cached). All conversations'
  turn k run concurrently, then turn k+1.

Prefill tokens computed come from the engines' own counters (`dsv4_prefill_tokens_total` on each worker's /metrics,
exported every heartbeat): per workload the prefill pool's total, per chat turn its increment; `unique_tokens` is
what a perfect cache would compute (shared: one copy of the prefix + the unique tokens; chat: every token of turn 1
once per conversation's own part, plus each turn's new tokens). One JSON line per workload and mode, then one line per
workload with the ratios (TTFT p50 off / on: aim >= 3; computed on / minimum: aim <= 1.1).

    .venv/bin/python bench/prefix_cache.py [--model PATH | --preset tiny-flash] [--requests 32] [--prefix 2048]
        [--unique 64] [--concurrency 4] [--cold] [--chats 4] [--turns 4] [--system 512] [--message 96] [--answer 32]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.services.local_redis import free_port

MODEL_NAME = "deepseek-v4-flash"
MAX_TOKENS = 4
HEARTBEAT_S = 0.3  # the workers export their engine counters every heartbeat


class Server:
    """`dsv4 serve` in a subprocess with two prefill workers; ready once it printed its banner."""

    def __init__(self, ckpt: Path, cache: bool, threads: int, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DSV4_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
        env |= {"DSV4_DISAGGREGATION__MODE": "always", "DSV4_HEARTBEAT_S": str(HEARTBEAT_S)}
        env["DSV4_TOKEN_TIMEOUT_S"] = "600"
        cmd = ["serve", "--model", str(ckpt), "--port", str(self.port), "--prefill-workers", "2"]
        if not cache:
            cmd.append("--no-prefix-cache")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4.services.cli", *cmd], env=env, stdout=subprocess.PIPE, text=True
        )
        self.metrics: dict[str, list[str]] = {}
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().startswith("metrics"):
                for url, role in re.findall(r"(http://\S+/metrics) \((\w+)\)", line):
                    self.metrics.setdefault(role, []).append(url)
            if line.strip().startswith("Ctrl-C"):
                break
        else:
            raise RuntimeError(f"dsv4 serve exited with {self.proc.wait()} before it was ready")

    def prefill_tokens(self, role: str) -> float:
        """The sum of `dsv4_prefill_tokens_total` over the role's workers (after one more heartbeat)."""
        time.sleep(3 * HEARTBEAT_S)
        total = 0.0
        for url in self.metrics.get(role, []):
            text = httpx.get(url, timeout=10).text
            total += sum(float(m) for m in re.findall(r"^dsv4_prefill_tokens_total\{[^}]*\} (\S+)$", text, re.M))
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


async def ttft(client: httpx.AsyncClient, url: str, prompt: list[int]) -> float:
    """Seconds from sending a streamed completion to its first token."""
    start = time.perf_counter()
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    first = 0.0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not first and line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                first = time.perf_counter() - start
    return first


async def shared_workload(server: Server, prompts: list[list[int]], concurrency: int, cold: bool) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        times = [] if cold else [await ttft(client, server.url, prompts[0])]
        gate = asyncio.Semaphore(concurrency)

        async def one(p: list[int]) -> float:
            async with gate:
                return await ttft(client, server.url, p)

        times += await asyncio.gather(*(one(p) for p in prompts[len(times) :]))
    return times


async def chat_workload(server: Server, chats: list[list[list[int]]]) -> tuple[list[float], list[float]]:
    """Turn by turn (every conversation's turn k together); returns TTFTs and each turn's computed tokens."""
    times: list[float] = []
    computed: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(len(chats[0])):
            before = server.prefill_tokens("prefill")
            times += await asyncio.gather(*(ttft(client, server.url, c[turn]) for c in chats))
            computed.append(server.prefill_tokens("prefill") - before)
    return times, computed


def _tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(3, 120000, (n,), generator=gen).tolist()


def _quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a --preset checkpoint written for this run)")
    ap.add_argument("--preset", default="tiny-flash", help="random checkpoint to write (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--unique", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cold", action="store_true", help="shared: no request alone first, all with --concurrency")
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system", type=int, default=512)
    ap.add_argument("--message", type=int, default=96)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine (default: %(default)s)")
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    prefix = _tokens(args.prefix, gen)
    shared = [prefix + _tokens(args.unique, gen) for _ in range(args.requests)]
    system = _tokens(args.system, gen)
    chats: list[list[list[int]]] = []
    for _ in range(args.chats):
        turns = [system + _tokens(args.message, gen)]
        for _ in range(args.turns - 1):
            turns.append(turns[-1] + _tokens(args.answer, gen) + _tokens(args.message, gen))
        chats.append(turns)
    minimum = {
        "shared": args.prefix + args.requests * args.unique,
        "chat": args.system + args.chats * (args.message + (args.turns - 1) * (args.answer + args.message)),
    }
    common = {"bench": "prefix_cache", "model": args.model or args.preset, "cpus": os.cpu_count()}
    results: dict[tuple[str, bool], dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ckpt = Path(args.model)
        else:
            print(f"writing {args.preset} checkpoint ...", file=sys.stderr)
            ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, quantized=True, seed=0)
        for cache in (True, False):
            print(f"dsv4 serve --prefill-workers 2{'' if cache else ' --no-prefix-cache'} ...", file=sys.stderr)
            server = Server(ckpt, cache, args.threads, Path(tmp))
            try:
                before = server.prefill_tokens("prefill")
                times = asyncio.run(shared_workload(server, shared, args.concurrency, args.cold))
                results[("shared", cache)] = {
                    "ttft": times,
                    "computed": server.prefill_tokens("prefill") - before,
                    "detail": {
                        "requests": args.requests,
                        "prefix": args.prefix,
                        "unique": args.unique,
                        "concurrency": args.concurrency,
                        "cold": args.cold,
                    },
                }
                times, per_turn = asyncio.run(chat_workload(server, chats))
                new_per_turn = [args.system + args.chats * args.message] + [
                    args.chats * (len(chats[0][t]) - len(chats[0][t - 1])) for t in range(1, args.turns)
                ]
                results[("chat", cache)] = {
                    "ttft": times,
                    "computed": sum(per_turn),
                    "detail": {
                        "chats": args.chats,
                        "turns": args.turns,
                        "computed_per_turn": per_turn,
                        "new_tokens_per_turn": new_per_turn,
                    },
                }
            finally:
                server.stop()
    for (workload, cache), r in results.items():
        times = r["ttft"]
        assert isinstance(times, list)
        line = {**common, "workload": workload, "cache": "on" if cache else "off", **r["detail"]}  # type: ignore[dict-item]
        line |= {"ttft_p50_s": round(statistics.median(times), 3), "ttft_p95_s": round(_quantile(times, 0.95), 3)}
        line |= {"prefill_tokens_computed": r["computed"], "minimum_tokens": minimum[workload]}
        print(json.dumps(line), flush=True)
    for workload in ("shared", "chat"):
        on, off = results[(workload, True)], results[(workload, False)]
        p50_on = statistics.median(on["ttft"])  # type: ignore[arg-type]
        p50_off = statistics.median(off["ttft"])  # type: ignore[arg-type]
        computed_on = float(on["computed"])  # type: ignore[arg-type]
        print(
            json.dumps(
                {
                    **common,
                    "workload": workload,
                    "ttft_p50_off_over_on": round(p50_off / p50_on, 2),
                    "computed_on_over_minimum": round(computed_on / minimum[workload], 3),
                    "computed_off_over_on": round(float(off["computed"]) / computed_on, 2),
                }
            ),  # type: ignore[arg-type]
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
