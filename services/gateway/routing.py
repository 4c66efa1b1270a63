"""Which worker of a pool gets a job: prefix-aware routing over the workers' KV events (docs/serving.md).

The router keeps one `PrefixIndex` per pool, fed by `kv_events.follow`. For a prompt it knows, for every live worker
(one whose KV-event snapshots keep coming), how many leading prompt tokens that worker's cache holds (its events,
plus this gateway's predictions: the prompts it sent there recently, and the ends of those it sent there in the last
minutes, which a chat's next turn extends) and how loaded it is: the new prompt tokens this gateway sent it that have
not produced their first token yet ("outstanding"), then the running and waiting requests it reports.

* `prefix`: the worker holding the longest prefix of the prompt (at least one block), ties by load, unless it is
  saturated (`max_queued_tokens` outstanding): computing a prefix another worker holds costs the pool its prefill
  a second time, so a holder is preferred while its backlog stays bounded (llm-d's precise scorer weighs the same
  two signals; Dynamo's KV router turns them into one cost in tokens).
* `load`: no unsaturated worker holds a block of it: the least loaded unsaturated worker (on a tie, the one holding
  fewer prefixes, so that different prefixes spread over the pool's caches). The prompt is then predicted there,
  so the requests that follow with the same prefix join it instead of computing it elsewhere.
* `shared`: no live worker is known, or every one is saturated: the shared stream, which every worker reads.

The job goes to the chosen worker's own stream (`WorkQueue.enqueue_in(..., to=worker)`); a worker that dies has its
own stream taken over by the others (`WorkQueue.reclaim`), so nothing routed to it is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from dsv4.protocol.config import PrefixRoutingConfig
from dsv4.services import kv_events
from dsv4.services.kv_events import PrefixIndex

Reason = Literal["prefix", "load", "shared"]


@dataclass(frozen=True)
class Route:
    """Where one job of pool `pool` goes (`worker` None: the shared stream), why, and what the router counted."""

    pool: str
    worker: str | None
    reason: Reason
    matched_tokens: int
    new_tokens: int


class PrefixRouter:
    """The routing of one pool (`pool`: the work stream's name) for one gateway."""

    def __init__(self, pool: str, config: PrefixRoutingConfig, index: PrefixIndex | None = None) -> None:
        self.pool, self.config = pool, config
        self.index = index if index is not None else PrefixIndex()
        self._outstanding: dict[str, int] = {}

    def outstanding(self, worker: str) -> int:
        """New prompt tokens sent to `worker` that have not produced their first token yet."""
        return self._outstanding.get(worker, 0)

    def choose(self, prompt_ids: Sequence[int], now: float | None = None) -> Route:
        """The route of a job with this prompt; the caller calls `done` once its first token came (or it failed)."""
        now = time.monotonic() if now is None else now
        n = len(prompt_ids)
        live = self.index.workers(now)
        if not self.config.enabled or not live:
            return Route(self.pool, None, "shared", 0, n)
        matched = self.index.matched_tokens(prompt_ids, now)
        usable = {w: min(m, n - 1) for w, m in matched.items()}  # the last token is always computed
        open_ = [w for w in live if self.outstanding(w) < self.config.max_queued_tokens]
        if not open_:
            return Route(self.pool, None, "shared", 0, n)

        def load(w: str) -> tuple[int, int, int, str]:
            # then the worker holding fewer prefixes: new prefixes spread over the pool's caches
            reported = live[w]
            return self.outstanding(w), reported.running + reported.waiting, self.index.held(w, now), w

        block = self.index.block_size or 1
        holders = [w for w in open_ if usable[w] >= block]
        if holders:
            worker = min(holders, key=lambda w: (-usable[w], *load(w)))
            reason: Reason = "prefix"
        else:
            worker, reason = min(open_, key=load), "load"
        new = n - usable[worker]
        self._outstanding[worker] = self.outstanding(worker) + new
        self.index.predict_prompt(worker, prompt_ids, now=now)
        return Route(self.pool, worker, reason, usable[worker], new)

    def done(self, route: Route) -> None:
        """The job of `route` produced its first token, failed, or was abandoned: it no longer loads its worker."""
        if route.worker is None:
            return
        left = self.outstanding(route.worker) - route.new_tokens
        if left > 0:
            self._outstanding[route.worker] = left
        else:
            self._outstanding.pop(route.worker, None)


async def follow_pools(
    client: aioredis.Redis, deployment: str, routers: Sequence[PrefixRouter], stop: asyncio.Event
) -> None:
    """Keep every router's index fed from its pool's KV events until `stop` is set."""
    await asyncio.gather(*(kv_events.follow(client, deployment, r.pool, r.index, stop) for r in routers))
