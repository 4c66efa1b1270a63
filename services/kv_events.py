"""KV events: which worker holds which prefixes, published by the workers for the gateway's prefix-aware routing (in
the manner of llm-d's precise prefix-cache scorer and Dynamo's KV router).

A worker appends events to its pool's `kv-events` stream: `stored` and `evicted` with the chain hashes of the
prefixes its engine cache gained or lost, every few seconds a `snapshot` with everything it holds and its load
(running and waiting requests), and `left` when it drains. Every event names the model (its fingerprint) and the
block size, the two inputs of the chain hashes (`model_runtime/engine/prefix_hash.py`), so a reader hashes a prompt
as that worker does. A snapshot replaces what a reader knew of that worker, so a lost event or a restarted reader
heals within one snapshot period, and a worker whose snapshots stop is forgotten. The stream is trimmed to about
MAX_EVENTS entries.

The index also takes predictions (as llm-d's approximate scorer does): the router records the prompt it just sent
to a worker as held there for a few seconds, so a burst of requests with one prefix lands on one worker before that
worker's events can say it holds the prefix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from dsv4.model_runtime.engine.prefix_hash import chain_hashes, chain_seed, tail_hash
from dsv4.protocol import keys
from dsv4.protocol.connection import MAX_BLOCK_MS, RedisUnavailable, unavailable_as_typed

log = logging.getLogger(__name__)

MAX_EVENTS = 20_000
SNAPSHOT_EVERY_S = 5.0
FORGET_AFTER_S = 3 * SNAPSHOT_EVERY_S
PREDICTION_TTL_S = 2 * SNAPSHOT_EVERY_S
END_TTL_S = 300.0  # a routed prompt's end: the next turn of a chat comes after the answer and the user's reply
MAX_ENDS = 4096  # routed prompt ends remembered per worker

Op = Literal["stored", "evicted", "snapshot", "left"]


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as it reports it."""

    running: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class KVEvent:
    """One event of one worker."""

    worker: str
    op: Op
    hashes: tuple[str, ...]
    block_size: int
    load: WorkerLoad | None = None
    model: str = ""  # the engine's model fingerprint (seeds the chain hashes with the block size)

    def to_fields(self) -> dict[bytes, bytes]:
        """The stream entry (hashes as raw digests, 16 bytes each)."""
        fields = {
            b"w": self.worker.encode(),
            b"op": self.op.encode(),
            b"h": b"".join(bytes.fromhex(h) for h in self.hashes),
            b"bs": str(self.block_size).encode(),
        }
        if self.model:
            fields[b"m"] = self.model.encode()
        if self.load is not None:
            fields[b"run"] = str(self.load.running).encode()
            fields[b"wait"] = str(self.load.waiting).encode()
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> KVEvent:
        """Parse an entry; raises ValueError on a malformed one."""
        try:
            raw, op = fields[b"h"], fields[b"op"].decode()
            if op not in ("stored", "evicted", "snapshot", "left") or len(raw) % 16:
                raise ValueError(f"op {op!r}, {len(raw)} hash bytes")
            load = WorkerLoad(int(fields[b"run"]), int(fields[b"wait"])) if b"run" in fields else None
            hashes = tuple(raw[i : i + 16].hex() for i in range(0, len(raw), 16))
            model = fields[b"m"].decode() if b"m" in fields else ""
            return cls(fields[b"w"].decode(), op, hashes, int(fields[b"bs"]), load, model)  # type: ignore[arg-type]
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"malformed KV event: {e}") from e


async def publish(client: aioredis.Redis, deployment: str, pool: str, event: KVEvent) -> None:
    """Append one event to the stream of the deployment's work pool `pool` (PREFILL_STREAM or DECODE_STREAM)."""
    with unavailable_as_typed("publishing a KV event"):
        await client.xadd(
            keys.kv_events_key(deployment, pool),
            event.to_fields(),  # type: ignore[arg-type]
            maxlen=MAX_EVENTS,
            approximate=True,
        )


@dataclass
class _Holder:
    hashes: set[str] = field(default_factory=set)
    predicted: dict[str, float] = field(default_factory=dict)  # hash -> until (monotonic)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    seen: float = 0.0
    model: str = ""
    block_size: int = 0
    # ends of prompts routed here, by the hash of their last full block (or the seed): (tail length, tail hash)
    ends: dict[str, dict[tuple[int, str], float]] = field(default_factory=dict)
    num_ends: int = 0

    def holds(self, h: str, now: float) -> bool:
        return h in self.hashes or self.predicted.get(h, 0.0) > now

    def prune_ends(self, now: float) -> None:
        for parent in list(self.ends):
            live = {k: t for k, t in self.ends[parent].items() if t > now}
            if live:
                self.ends[parent] = live
            else:
                del self.ends[parent]
        self.num_ends = sum(len(v) for v in self.ends.values())


class PrefixIndex:
    """What every worker of one pool holds, as its events say (pure; fed by `follow`)."""

    def __init__(self, forget_after_s: float = FORGET_AFTER_S) -> None:
        self.forget_after_s = forget_after_s
        self.block_size: int | None = None
        self._workers: dict[str, _Holder] = {}

    def apply(self, event: KVEvent, now: float | None = None) -> None:
        """Fold one event in."""
        now = time.monotonic() if now is None else now
        self.block_size = event.block_size
        if event.op == "left":  # a draining worker: no more work for it
            self._workers.pop(event.worker, None)
            return
        holder = self._workers.setdefault(event.worker, _Holder())
        holder.seen, holder.block_size = now, event.block_size
        holder.model = event.model or holder.model
        if event.op == "snapshot":
            holder.hashes = set(event.hashes)
        elif event.op == "stored":
            holder.hashes.update(event.hashes)
        else:
            holder.hashes.difference_update(event.hashes)
            for h in event.hashes:
                holder.predicted.pop(h, None)
        if event.load is not None:
            holder.load = event.load

    def workers(self, now: float | None = None) -> dict[str, WorkerLoad]:
        """The live workers (a snapshot within `forget_after_s`) and their last reported load."""
        now = time.monotonic() if now is None else now
        for name in [n for n, h in self._workers.items() if now - h.seen > self.forget_after_s]:
            del self._workers[name]
        return {name: h.load for name, h in self._workers.items()}

    def matched_blocks(self, chain_hashes: Sequence[str], now: float | None = None) -> dict[str, int]:
        """For each live worker, how many leading blocks of the prompt its longest held prefix covers."""
        now = time.monotonic() if now is None else now
        out: dict[str, int] = {}
        for name in self.workers(now):
            holder = self._workers[name]
            out[name] = next(
                (i + 1 for i in range(len(chain_hashes) - 1, -1, -1) if holder.holds(chain_hashes[i], now)), 0
            )
        return out

    def held(self, worker: str, now: float | None = None) -> int:
        """How many prefixes `worker` holds (its events and the unexpired predictions)."""
        now = time.monotonic() if now is None else now
        holder = self._workers.get(worker)
        if holder is None:
            return 0
        return len(holder.hashes) + sum(1 for h, t in holder.predicted.items() if t > now and h not in holder.hashes)

    def prompt_hashes(self, worker: str, token_ids: Sequence[int]) -> list[str]:
        """The prompt's chain hashes as `worker` computes them (its model and block size); [] when it named neither."""
        holder = self._workers.get(worker)
        if holder is None or not holder.model or holder.block_size < 1:
            return []
        return chain_hashes(chain_seed(holder.model, holder.block_size), token_ids, holder.block_size)

    def matched_tokens(self, token_ids: Sequence[int], now: float | None = None) -> dict[str, int]:
        """For each live worker, how many leading tokens of the prompt its longest held (or predicted) prefix
        covers; workers of one model and block size share one hashing of the prompt."""
        now = time.monotonic() if now is None else now
        by_seed: dict[tuple[str, int], list[str]] = {}
        out: dict[str, int] = {}
        for name in self.workers(now):
            holder = self._workers[name]
            seed = (holder.model, holder.block_size)
            if seed not in by_seed:
                by_seed[seed] = self.prompt_hashes(name, token_ids)
            hashes = by_seed[seed]
            blocks = next((i + 1 for i in range(len(hashes) - 1, -1, -1) if holder.holds(hashes[i], now)), 0)
            out[name] = max(blocks * holder.block_size, self._matched_end(holder, hashes, token_ids, now))
        return out

    @staticmethod
    def _matched_end(holder: _Holder, hashes: Sequence[str], token_ids: Sequence[int], now: float) -> int:
        """The longest end of a prompt routed to `holder` that is a prefix of this one (a previous chat turn)."""
        b = holder.block_size
        for k in range(len(hashes), -1, -1):
            parent = hashes[k - 1] if k else chain_seed(holder.model, b).hex()
            best = 0
            for (length, h), until in holder.ends.get(parent, {}).items():
                end = k * b + length
                fits = until > now and best < end <= len(token_ids)
                if fits and tail_hash(bytes.fromhex(parent), token_ids[k * b : end]) == h:
                    best = end
            if best:
                return best
        return 0

    def predict(
        self, worker: str, hashes: Sequence[str], ttl_s: float = PREDICTION_TTL_S, now: float | None = None
    ) -> None:
        """Count `hashes` as held by `worker` for `ttl_s` (a prompt just sent there; its events will confirm)."""
        now = time.monotonic() if now is None else now
        holder = self._workers.get(worker)
        if holder is None:
            return
        holder.predicted = {h: t for h, t in holder.predicted.items() if t > now}
        until = now + ttl_s
        for h in hashes:
            holder.predicted[h] = until

    def predict_prompt(self, worker: str, token_ids: Sequence[int], now: float | None = None) -> None:
        """A prompt was just sent to `worker`: its blocks count as held there for PREDICTION_TTL_S (until its events
        say so), and its end for END_TTL_S. Engines cache every prompt's end, which no event names (only block
        boundaries have hashes everyone can compute): so a chat's next turn, which extends this prompt, goes where
        this one went."""
        now = time.monotonic() if now is None else now
        holder = self._workers.get(worker)
        if holder is None or holder.block_size < 1:
            return
        hashes = self.prompt_hashes(worker, token_ids)
        self.predict(worker, hashes, now=now)
        b = holder.block_size
        k = len(token_ids) // b
        if len(token_ids) == k * b:
            return  # an aligned end is a block hash: the worker's events name it
        parent = hashes[k - 1] if k else chain_seed(holder.model, b).hex()
        tail = len(token_ids) - k * b
        holder.ends.setdefault(parent, {})[(tail, tail_hash(bytes.fromhex(parent), token_ids[k * b :]))] = (
            now + END_TTL_S
        )
        holder.num_ends += 1
        if holder.num_ends > MAX_ENDS:
            holder.prune_ends(now)
            while holder.num_ends > MAX_ENDS:  # still full: the oldest parent's ends go
                holder.num_ends -= len(holder.ends.pop(next(iter(holder.ends))))


async def follow(client: aioredis.Redis, deployment: str, pool: str, index: PrefixIndex, stop: asyncio.Event) -> None:
    """Feed `index` from pool `pool`'s stream until `stop` is set: the retained history first, then new events as
    they come. Redis outages are waited out (the index ages, and heals with the next snapshots)."""
    key, last = keys.kv_events_key(deployment, pool), "0-0"
    while not stop.is_set():
        try:
            with unavailable_as_typed("reading KV events"):
                batches: Any = await client.xread({key: last}, count=1000, block=MAX_BLOCK_MS)
        except RedisUnavailable as e:
            log.warning("%s; retrying", e)
            await asyncio.sleep(1.0)
            continue
        for _, entries in batches or []:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    index.apply(KVEvent.from_fields(fields))
                except ValueError as e:
                    log.warning("skipped a KV event %s: %s", last, e)


def snapshot_event(worker: str, hashes: Iterable[str], block_size: int, load: WorkerLoad, model: str = "") -> KVEvent:
    """The periodic full report of one worker."""
    return KVEvent(worker, "snapshot", tuple(hashes), block_size, load, model)
