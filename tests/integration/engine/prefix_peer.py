"""Subprocess half of the cross-process prefix-tier test (test_prefix_tier_exchange.py).

`publish CKPT REDIS_URL OUT`: a prefill worker's engine and its `PrefixSharing` prefill a prompt; the worker publishes
the aligned prefix to the Redis tier. `import CKPT REDIS_URL OUT`: another worker's engine imports that prefix from the
tier before prefilling a prompt that extends it, then decodes; it records its tokens and the prefill tokens it
computed. Both engines run float64 (their chunks differ: exactness must not depend on fp32 rounding).
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.protocol import keys
from dsv4.protocol.connection import connect
from dsv4.services.prefix_tier import PrefixTier
from dsv4.services.workers.prefix_sharing import PrefixSharing

DEP = "xproc"
BLOCK = 16
PREFIX = torch.randint(3, 128000, (3 * BLOCK,), generator=torch.Generator().manual_seed(5)).tolist()
PROMPT_A = [*PREFIX, 101, 102, 103]
PROMPT_B = [*PREFIX, 201, 202, 203, 204, 205]
SPECS = {
    "greedy": SamplingSpec(max_tokens=8, temperature=0.0, ignore_eos=True),
    "seeded": SamplingSpec(max_tokens=8, temperature=0.8, top_k=30, seed=7, ignore_eos=True),
}


def engine(ckpt: str) -> AsyncEngine:
    config = EngineConfig(block_size=BLOCK)
    return AsyncEngine(LLMEngine.from_path(ckpt, dtype=torch.float64, config=config))


async def publish(ckpt: str, redis_url: str, out: Path) -> None:
    client = connect(redis_url)
    tier = PrefixTier(client, DEP, budget_bytes=1 << 30, ttl_s=300)
    with engine(ckpt) as e:
        sharing = PrefixSharing(client, DEP, keys.PREFILL_STREAM, "peer-a", e, tier, snapshot_every_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(sharing.run(stop))
        res = await e.prefill("a", PROMPT_A, SPECS["greedy"])
        list(res.kv_chunks)
        hashes = sharing.prompt_hashes(PREFIX)
        for _ in range(200):
            if await tier.longest(hashes) == len(hashes) - 1:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        (out / "published.json").write_text(json.dumps({"hashes": hashes, "tier": asdict(await tier.stats())}))
    await client.aclose()


async def import_(ckpt: str, redis_url: str, out: Path) -> None:
    client = connect(redis_url)
    tier = PrefixTier(client, DEP, budget_bytes=1 << 30, ttl_s=300)
    record = {}
    with engine(ckpt) as e:
        sharing = PrefixSharing(client, DEP, keys.PREFILL_STREAM, "peer-b", e, tier)
        record["imported"] = await sharing.before_prefill(PROMPT_B)
        for name, spec in SPECS.items():
            before = e.stats().extra["prefill_tokens"]
            await e.submit_decode(name, PROMPT_B, spec, kv_blob=None, streamed_ids=[])
            tokens = [t.token_id async for t in e.stream(name)]
            record[name] = {"tokens": tokens, "computed": e.stats().extra["prefill_tokens"] - before}
    (out / "imported.json").write_text(json.dumps(record))
    await client.aclose()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = {"publish": publish, "import": import_}[sys.argv[1]]
    asyncio.run(mode(sys.argv[2], sys.argv[3], Path(sys.argv[4])))
