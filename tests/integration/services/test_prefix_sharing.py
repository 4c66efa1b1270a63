"""A worker's prefix sharing through a real redis-server with the real engine: a crafted, foreign or stale blob in the
tier is refused by the engine, discarded from the tier and the prompt recomputed to the same tokens; KV events and
the prefix-stats entry say what the worker holds; a draining worker announces that it left."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.async_engine import AsyncEngine
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.port import SamplingSpec
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.make_checkpoint import write_checkpoint
from dsv4.protocol import keys
from dsv4.protocol.connection import connect
from dsv4.services.kv_events import PrefixIndex, follow
from dsv4.services.local_redis import LocalRedis
from dsv4.services.prefix_tier import PrefixTier
from dsv4.services.workers.prefix_sharing import PrefixSharing

pytestmark = pytest.mark.integration

DEP = "share"
BLOCK = 16
PREFIX = torch.randint(3, 128000, (2 * BLOCK,), generator=torch.Generator().manual_seed(9)).tolist()
PROMPT = [*PREFIX, 301, 302, 303, 304]
SPEC = SamplingSpec(max_tokens=6, temperature=0.0, ignore_eos=True)


def _engine(ckpt: Path, cache: bool = True) -> LLMEngine:
    return LLMEngine.from_path(ckpt, dtype=torch.float64, config=EngineConfig(block_size=BLOCK, prefix_cache=cache))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("share")
    return {
        "flash": write_checkpoint(root / "flash", "tiny-flash", quantized=True, seed=0),
        "pro": write_checkpoint(root / "pro", "tiny-pro", quantized=True, seed=0),
    }


@pytest.fixture(scope="module")
def blobs(ckpts: dict[str, Path]) -> dict[str, bytes]:
    """The exported states of PREFIX (and of its first block) by a tiny-flash engine, and one by tiny-pro."""
    out = {}
    for name, ckpt in ckpts.items():
        e = _engine(ckpt)
        for length in (BLOCK, 2 * BLOCK):  # a prompt one token past `length` leaves an entry at `length`
            e.generate_ids([[*PREFIX[:length], 7]], SamplingParams.from_spec(SPEC))
            chain = e.kv.cache.prompt(PREFIX[:length]).hashes[-1]  # type: ignore[union-attr]
            exported = e.export_prefix(chain, 1 << 20)
            assert exported, f"{name}: no entry at {length}"
            out[f"{name}-{length}"] = b"".join(exported)
    return out


@pytest.fixture
async def client(redis_server: LocalRedis) -> AsyncIterator[object]:
    c = connect(redis_server.url)
    yield c
    await c.aclose()


def _damaged(blobs: dict[str, bytes], kind: str) -> bytes:
    good = blobs["flash-32"]
    if kind == "crafted":  # one flipped byte in the body: its chunk's crc32c fails
        data = bytearray(good)
        data[-100] ^= 0x40
        return bytes(data)
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "foreign":  # another model's state (tiny-pro) under tiny-flash's key
        return blobs["pro-32"]
    if kind == "stale":  # an older format version
        return good[:8] + struct.pack("<I", kv_export.FORMAT_VERSION + 7) + good[12:]
    assert kind == "shorter"  # the state of the first block only, under the key of the first two
    return blobs["flash-16"]


@pytest.mark.parametrize("kind", ["crafted", "truncated", "foreign", "stale", "shorter"])
async def test_a_bad_blob_in_the_tier_is_refused_discarded_and_recomputed(
    ckpts: dict[str, Path], blobs: dict[str, bytes], client: object, kind: str
) -> None:
    want = _engine(ckpts["flash"], cache=False).generate_ids([PROMPT], SamplingParams.from_spec(SPEC))[0].token_ids
    tier = PrefixTier(client, DEP, budget_bytes=1 << 30, ttl_s=60)  # type: ignore[arg-type]
    refused = REGISTRY.get_sample_value("dsv4_prefix_tier_imports_total", {"result": "refused"}) or 0.0
    with AsyncEngine(_engine(ckpts["flash"])) as engine:
        sharing = PrefixSharing(client, DEP, keys.PREFILL_STREAM, "w", engine, tier)  # type: ignore[arg-type]
        key = sharing.prompt_hashes(PREFIX)[-1]
        assert await tier.publish(key, _damaged(blobs, kind))
        assert await sharing.before_prefill(PROMPT) == 0
        assert await tier.longest([key]) == -1, "the refused blob is discarded"
        assert REGISTRY.get_sample_value("dsv4_prefix_tier_imports_total", {"result": "refused"}) == refused + 1
        out = await engine.prefill("r", PROMPT, SPEC)
        await engine.submit_decode("d", PROMPT, SPEC, kv_blob=b"".join(out.kv_chunks), streamed_ids=[out.first_token])
        tokens = [out.first_token] + [t.token_id async for t in engine.stream("d")]
        assert tokens == want
        assert engine.stats().extra["prefill_tokens"] == len(PROMPT) + 1  # recomputed; + the replayed token 0


async def test_a_good_blob_is_imported_and_the_worker_reports_what_it_holds(
    ckpts: dict[str, Path], blobs: dict[str, bytes], client: object
) -> None:
    tier = PrefixTier(client, DEP + "2", budget_bytes=1 << 30, ttl_s=60)  # type: ignore[arg-type]
    index, stop_follow = PrefixIndex(), asyncio.Event()
    reader = asyncio.create_task(follow(client, DEP + "2", keys.PREFILL_STREAM, index, stop_follow))  # type: ignore[arg-type]
    with AsyncEngine(_engine(ckpts["flash"])) as engine:
        sharing = PrefixSharing(client, DEP + "2", keys.PREFILL_STREAM, "w2", engine, tier, snapshot_every_s=0.1)  # type: ignore[arg-type]
        hashes = sharing.prompt_hashes(PREFIX)
        assert await tier.publish(hashes[-1], blobs["flash-32"])
        assert await sharing.before_prefill(PROMPT) == 2 * BLOCK
        assert await engine.cached_prefix_len(PROMPT) == 2 * BLOCK
        stop = asyncio.Event()
        task = asyncio.create_task(sharing.run(stop))
        for _ in range(100):
            if index.matched_tokens(PROMPT).get("w2") == 2 * BLOCK:
                break
            await asyncio.sleep(0.05)
        assert index.matched_tokens(PROMPT) == {"w2": 2 * BLOCK}
        raw = await client.hget(keys.prefix_stats_key(DEP + "2"), "w2")  # type: ignore[attr-defined]
        assert json.loads(raw)["pool"] == keys.PREFILL_STREAM
        stop.set()
        await task  # leaving: the gateways forget the worker at once
        for _ in range(100):
            if "w2" not in index.workers():
                break
            await asyncio.sleep(0.05)
        assert "w2" not in index.workers()
        assert await client.hget(keys.prefix_stats_key(DEP + "2"), "w2") is None  # type: ignore[attr-defined]
    stop_follow.set()
    await asyncio.wait_for(reader, 5)
