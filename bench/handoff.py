"""KV handoff throughput against raw Redis SET+GET of the same bytes, measured in the same run.

    .venv/bin/python bench/handoff.py [--sizes-mib 1,4,16,64,256] [--reps 3] [--redis-url URL] [--direct]

One JSON line per size and data plane: handoff MB/s (write + verified read; release untimed) and the baseline MB/s of a
single SET and GET of the whole blob on the same client and server; `ratio` = handoff / baseline (aim ≥ 0.8).
Without --redis-url a private redis-server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI

from dsv4.model_runtime.engine.port import KVMeta
from dsv4.protocol.connection import connect
from dsv4.protocol.keys import descriptor_key
from dsv4.services.handoff import HandoffReader, HandoffWriter
from dsv4.services.kv_direct import DirectStore, direct_router
from dsv4.services.local_redis import LocalRedis, free_port

DEP = "bench"
FP = "bench-fp"


def engine_parts(blob: bytes, part: int = 4 << 20) -> Iterator[bytes]:
    view = memoryview(blob)
    for i in range(0, len(blob), part):
        yield bytes(view[i : i + part])


async def raw_set_get(client: aioredis.Redis, blob: bytes) -> float:
    t0 = time.perf_counter()
    await client.set("raw", blob)
    got = await client.get("raw")
    dt = time.perf_counter() - t0
    assert got == blob
    await client.delete("raw")
    return dt


async def handoff_round(writer: HandoffWriter, reader: HandoffReader, blob: bytes) -> float:
    # The prefill worker materializes the engine's export before the handoff starts (its kv.export span), so
    # the parts exist before the clock starts here too.
    parts = list(engine_parts(blob))
    t0 = time.perf_counter()
    meta = KVMeta(format_version=1, model_fingerprint=FP, total_bytes=len(blob), num_tokens=1)
    desc = await writer.write("bench", meta, parts, first_token=0)
    got = await reader.read(descriptor_key(DEP, desc.handoff_id), model_fingerprint=FP, kv_format_version=1)
    dt = time.perf_counter() - t0
    assert got.blob == blob
    await reader.release(got.descriptor)  # cleanup is outside the timing, as for the baseline
    return dt


@contextlib.asynccontextmanager
async def direct_server(store: DirectStore) -> AsyncIterator[str]:
    app = FastAPI()
    app.include_router(direct_router(store))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def run(url: str, sizes_mib: list[int], reps: int, direct: bool) -> None:
    client = connect(url, socket_timeout=120)
    reader = HandoffReader(client, DEP)
    store = DirectStore()
    async with direct_server(store) as direct_url:
        planes = {"redis": HandoffWriter(client, DEP)}
        if direct:
            planes["direct"] = HandoffWriter(client, DEP, transport="direct", direct_store=store, direct_url=direct_url)
        for mib in sizes_mib:
            blob = os.urandom(mib << 20)
            for plane, writer in planes.items():
                base, hand = [], []
                for _ in range(reps):  # interleaved, so drift in machine load hits both alike
                    base.append(await raw_set_get(client, blob))
                    hand.append(await handoff_round(writer, reader, blob))
                mb = len(blob) / 1e6
                row = {
                    "bench": "handoff",
                    "transport": plane,
                    "size_mib": mib,
                    "reps": reps,
                    "handoff_mb_s": round(mb / min(hand), 1),
                    "raw_set_get_mb_s": round(mb / min(base), 1),
                    "ratio": round(min(base) / min(hand), 3),
                }
                print(json.dumps(row), flush=True)
    await reader.aclose()
    await client.aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="1,4,16,64,256")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--redis-url")
    p.add_argument("--direct", action="store_true", help="also measure the direct (HTTP pull) data plane")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    if args.redis_url:
        asyncio.run(run(args.redis_url, sizes, args.reps, args.direct))
        return 0
    with LocalRedis() as server:
        print(f"# private redis-server on {server.url}", file=sys.stderr)
        asyncio.run(run(server.url, sizes, args.reps, args.direct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
