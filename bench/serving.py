"""Disaggregated serving against single-process serving: output tokens/s on the same checkpoint, prompts, same run.

Single process: the engine in this process, `LLM.generate` on the whole batch (`single_llm`) and `AsyncEngine` with
every request streamed concurrently (`single_async`, local prefill). Disaggregated: `dsv4 serve` (gateway, prefill and
decode processes over Redis) with `DSV4_DISAGGREGATION__MODE` = each of `--modes` (`always`: prefill worker + KV
handoff; `never`: the decode worker prefills), the requests sent at once as streamed `/v1/completions` by the openai
client. Greedy, EOS ignored, so every variant generates the same tokens (`identical` = share of texts equal to
`single_llm`'s). Each variant runs `--reps` times, interleaved, and the best wall time counts (the machine is
shared). One JSON line per variant, then one ratio line per mode: disaggregated / single_llm tokens/s (aim ≥ 0.9).

    .venv/bin/python bench/serving.py [--model PATH | --preset tiny-flash|small-flash] [--requests 16] [--prompt 64]
                                      [--tokens 32] [--threads 1] [--reps 3] [--modes always,never]
                                      [--broker auto|redis-server|in-process]
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
import uuid
from pathlib import Path

import openai
import torch

from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm import LLM
from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.services.local_redis import free_port

MODEL_NAME = "deepseek-v4-flash"


class Server:
    """`dsv4 serve --model CKPT` in a subprocess with one disaggregation mode; ready once it printed its banner."""

    def __init__(self, ckpt: Path, mode: str, broker: str, threads: int, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "DSV4_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
        env["DSV4_DISAGGREGATION__MODE"] = mode
        cmd = ["serve", "--model", str(ckpt), "--port", str(self.port), "--broker", broker]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4.services.cli", *cmd], env=env, stdout=subprocess.PIPE, text=True
        )
        self.redis = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if m := re.search(r"ready in ([\d.]+) s", line):
                self.ready_s = float(m.group(1))
            elif m := re.match(r"\s+redis\s+(.+)", line):
                self.redis = m.group(1).strip()
                break
        else:
            raise RuntimeError(f"dsv4 serve exited with {self.proc.wait()} before it was ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


async def run_server(url: str, prompts: list[list[int]], tokens: int) -> tuple[float, list[str], list[float]]:
    """All requests at once, streamed; returns wall seconds, texts and times to first token."""
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as client:

        async def one(prompt: list[int]) -> tuple[str, float]:
            start = time.perf_counter()
            ttft = 0.0
            text = ""
            stream = await client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    ttft = ttft or time.perf_counter() - start
                    text += chunk.choices[0].text
            return text, ttft

        start = time.perf_counter()
        done = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - start, [t for t, _ in done], [f for _, f in done]


def run_llm(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


async def run_async_engine(engine: AsyncEngine, prompts: list[list[int]], tokens: int) -> tuple[float, list[float]]:
    """Every request submitted at once with local prefill and streamed; returns wall seconds and times to first
    token."""
    spec = SamplingSpec(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(prompt: list[int]) -> float:
        rid = uuid.uuid4().hex
        start = time.perf_counter()
        await engine.submit_decode(rid, prompt, spec, kv_blob=None, streamed_ids=())
        ttft = 0.0
        async for _ in engine.stream(rid):
            ttft = ttft or time.perf_counter() - start
        return ttft

    start = time.perf_counter()
    ttfts = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start, list(ttfts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a --preset checkpoint written for this run)")
    ap.add_argument("--preset", default="tiny-flash", help="random checkpoint to write (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests (default: %(default)s)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions, best counts (default: %(default)s)")
    ap.add_argument("--modes", default="always,never", help="disaggregation modes to serve (default: %(default)s)")
    ap.add_argument("--broker", default="auto", choices=("auto", "redis-server", "in-process"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ckpt = Path(args.model)
        else:
            print(f"writing {args.preset} checkpoint ...", file=sys.stderr)
            ckpt = write_checkpoint(Path(tmp) / args.preset, args.preset, quantized=True, seed=0)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 128000, (args.requests, args.prompt), generator=gen).tolist()
        warm = prompts[:2]
        print("starting the single-process engines and dsv4 serve ...", file=sys.stderr)
        llm = LLM(str(ckpt))
        engine = AsyncEngine.from_path(str(ckpt))
        servers = {m: Server(ckpt, m, args.broker, args.threads, Path(tmp)) for m in args.modes.split(",")}
        try:
            run_llm(llm, warm, 2)
            asyncio.run(run_async_engine(engine, warm, 2))
            for s in servers.values():
                asyncio.run(run_server(s.url, warm, 2))
            best: dict[str, float] = {}
            ttft: dict[str, list[float]] = {}
            texts: dict[str, list[str]] = {}
            reference: list[str] = []
            tok = Tokenizer.from_pretrained(ckpt)
            for rep in range(args.reps):
                print(f"repetition {rep + 1}/{args.reps} ...", file=sys.stderr)
                seconds, ids = run_llm(llm, prompts, args.tokens)
                best["single_llm"] = min(seconds, best.get("single_llm", float("inf")))
                reference = [tok.decode(i, skip_special_tokens=True) for i in ids]
                seconds, firsts = asyncio.run(run_async_engine(engine, prompts, args.tokens))
                if seconds < best.get("single_async", float("inf")):
                    best["single_async"], ttft["single_async"] = seconds, firsts
                for mode, s in servers.items():
                    seconds, out, firsts = asyncio.run(run_server(s.url, prompts, args.tokens))
                    name = f"disaggregated_{mode}"
                    if seconds < best.get(name, float("inf")):
                        best[name], ttft[name], texts[name] = seconds, firsts, out
        finally:
            engine.close()
            for s in servers.values():
                s.stop()
    model = args.model or args.preset
    common = {
        "bench": "serving",
        "model": model,
        "requests": args.requests,
        "prompt": args.prompt,
        "tokens": args.tokens,
    }
    common |= {"threads": args.threads, "reps": args.reps, "cpus": os.cpu_count()}
    total = args.requests * args.tokens
    for name, seconds in best.items():
        line: dict[str, object] = {**common, "variant": name, "seconds": round(seconds, 3)}
        line["tokens_per_s"] = round(total / seconds, 1)
        if name in ttft:
            line["ttft_p50_s"] = round(statistics.median(ttft[name]), 3)
        if name in texts:
            mode = name.removeprefix("disaggregated_")
            line["identical"] = sum(a == b for a, b in zip(texts[name], reference, strict=True)) / len(reference)
            line["broker"] = servers[mode].redis
            line["serve_ready_s"] = servers[mode].ready_s
        print(json.dumps(line), flush=True)
    for mode in servers:
        ratio = best["single_llm"] / best[f"disaggregated_{mode}"]
        vs_async = best["single_async"] / best[f"disaggregated_{mode}"]
        print(json.dumps({**common, "ratio": f"disaggregated_{mode}/single_llm", "value": round(ratio, 3),
                          "vs_single_async": round(vs_async, 3)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
