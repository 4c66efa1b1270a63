"""Continuous batching: which sequences run this step and how many of their tokens (chunked prefill).

Every step takes the running sequences first (one token for a decoding sequence, a chunk of the remaining
prompt for a prefilling one), then admits waiting sequences in arrival order while the token budget, the
sequence limit and the KV pool allow. A running sequence that cannot grow preempts the most recently admitted
one: its state is freed and it goes back to the front of the queue, to be recomputed (never a crash).

With the prefix cache (`prefix_cache.py`), a sequence is admitted at the longest cached prefix of its tokens and
its prefill chunks end at its snapshot points, where the step's end makes cache entries of its state (`after_step`).
A waiting sequence whose prompt shares a longer prefix with a sequence prefilling now waits for that one to reach it
(the point is added to the running sequence's) instead of computing it a second time; others are admitted past it.
Blocks only the cache holds are reclaimed (evicting entries) before anyone is preempted.

With overlapped scheduling a step is scheduled while the previous step's tokens are on their way (`ahead`): the
sequences waiting for one decode it from the device (an MTP row verifies its draft after it), and nobody is preempted
(the schedule is refused instead).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from dsv4.model_runtime.engine.kv_groups import GroupKV
from dsv4.model_runtime.engine.kv_state import KVCacheManager
from dsv4.model_runtime.engine.prefix_cache import CacheEntry, Prompt, common_prefix, snapshot_points
from dsv4.model_runtime.engine.request import Request, RequestStatus

BRANCH_SAMPLE = 64  # waiting requests a new sequence's branch points are looked for in


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # token budget of one step
    chunked_prefill: bool = True  # False: a prompt is prefilled in one piece (budget permitting)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("SchedulerConfig: max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at `seq.num_computed`, run this step."""

    seq: Request
    num_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager | GroupKV) -> None:
        self.config, self.kv = config, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefill_tokens = 0  # prompt (and replayed) tokens computed, the prefix cache's hits left out
        self._after: dict[str, int] = {}  # this step: where each scheduled sequence's state will stand after it

    def add(self, seq: Request) -> None:
        """Queue a sequence; raises ValueError when its longest possible length can never fit the KV pool."""
        longest = len(seq.prompt_token_ids) + seq.params.max_tokens
        if not self.kv.fits_alone(longest):
            raise ValueError(
                f"request {seq.request_id}: {longest} tokens (prompt + max_tokens) need "
                f"{self.kv.blocks_for(longest)} KV blocks but the pool has {self.kv.total_blocks}"
            )
        seq.status = RequestStatus.WAITING
        self.waiting.append(seq)

    def get(self, request_id: str) -> Request | None:
        """The waiting or running sequence with this id."""
        return next((s for s in [*self.waiting, *self.running] if s.request_id == request_id), None)

    def abort(self, request_id: str) -> Request | None:
        """Remove a sequence wherever it is and free its state; returns it (None if unknown)."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.kv.free(seq)
                return seq
        return None

    def finish(self, seq: Request, keep_state: bool = False) -> None:
        """Take a finished sequence out of the batch; its state is freed unless the caller still needs it."""
        self.running.remove(seq)
        if not keep_state:
            self.kv.free(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ahead: Collection[Request] | None = None) -> list[ScheduledChunk] | None:
        """The chunks to run this step; each chunk's KV capacity is reserved.

        `ahead` (overlapped scheduling, `LLMEngine.step`): the step is scheduled while a launched step's tokens are
        still on their way; the running sequences of `ahead` decode the token on its way (one each), the other
        sequences the launched step holds are left out, and nobody may be preempted (a preempted sequence would
        lose the token on its way): None when a sequence cannot grow, with nothing but the reserved room changed.
        Without `ahead` the result is never None."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        self._after = {}
        counted = self.prefill_tokens
        for seq in list(self.running):
            if seq not in self.running:  # preempted by an earlier sequence of this loop
                continue
            n = reserve = self._chunk_len(seq, budget, not chunks)
            if ahead is not None and seq in ahead:
                n, reserve = self._ahead(seq, budget)
            if n == 0:
                continue
            while not self.kv.can_grow(seq, reserve):
                if ahead is not None:  # growing is idempotent: what was reserved is reserved again next time
                    self.prefill_tokens = counted
                    return None
                victim = next(v for v in reversed(self.running) if self.kv.shares_pool(v, seq))
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.kv.grow(seq, reserve)
            budget -= self._scheduled(chunks, seq, n)
        i = 0
        while i < len(self.waiting) and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[i]
            entry, wait = self._plan(seq)
            if wait:  # a running sequence is computing a longer prefix of it right now
                i += 1
                continue
            start = entry.position if entry is not None else seq.num_computed
            if self.kv.cache is not None and seq.prefix is not None:
                seq.cache_points = self._points(seq, start)
            n = self._chunk_len(seq, budget, first=not chunks, start=start)
            if n == 0 or not self.kv.admit(seq, entry, n):
                seq.cache_points = []
                break
            self._count_lookup(seq, entry)
            del self.waiting[i]
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            budget -= self._scheduled(chunks, seq, n)
        return chunks

    @staticmethod
    def _ahead(seq: Request, budget: int) -> tuple[int, int]:
        """(tokens, positions to reserve) of a sequence with a launched step's tokens on their way: one token; an MTP
        row verifies a draft after it, and the landing may move it one position further (an accepted draft), so it
        reserves three. (0, 0): the budget has no room for it."""
        n = 2 if seq.use_mtp else 1
        return (n, n + seq.use_mtp) if budget >= n else (0, 0)

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """After the model ran `chunks`: cache entries of the states that stand at one of their snapshot points."""
        for chunk in chunks:
            seq = chunk.seq
            while seq.cache_points and seq.cache_points[0] <= seq.num_computed:
                point = seq.cache_points.pop(0)
                if point == seq.num_computed and seq.state is not None and seq.prefix is not None:
                    self.kv.snapshot(seq, seq.prefix, point)

    def _scheduled(self, chunks: list[ScheduledChunk], seq: Request, n: int) -> int:
        chunks.append(ScheduledChunk(seq, n))
        self._after[seq.request_id] = seq.num_computed + n
        self.prefill_tokens += max(0, min(seq.num_computed + n, seq.prefill_len) - seq.num_computed)
        return n

    def _prompt(self, seq: Request) -> Prompt:
        """The tokens the sequence's state must hold before it samples (prompt + replayed or already generated
        ones), with their chain hashes; computed once per admission."""
        n = seq.num_tokens
        if seq.prefix is None or len(seq.prefix) != n:
            cache = self.kv.cache
            tokens = seq.prompt_token_ids if not seq.output_token_ids else seq.token_ids
            seq.prefix = cache.prompt(tokens) if cache is not None else Prompt(tokens)
        return seq.prefix

    def _plan(self, seq: Request) -> tuple[CacheEntry | None, bool]:
        """The cache entry a waiting sequence resumes from, and whether it should rather wait for a running one."""
        seq.prefill_len = seq.num_tokens
        cache = self.kv.cache
        if cache is None or seq.snapshot is not None:  # an imported state is the sequence's whole prompt already
            return None, False
        prompt = self._prompt(seq)
        n = len(prompt)
        entry = cache.lookup(prompt, n - 1)  # the last token is computed: its logits give the next token
        start = entry.position if entry is not None else 0
        if not self.config.chunked_prefill:
            return entry, False
        for other in self.running:
            after = self._after.get(other.request_id, other.num_computed)
            if other.prefix is None or after >= other.prefill_len:
                continue  # not prefilling (any more)
            d = min(common_prefix(prompt, other.prefix, cache.block_size), n - 1, other.prefill_len)
            if d < after or d <= start:
                continue
            if d in other.cache_points:  # a snapshot it takes anyway
                return entry, True
            if d - start >= self.min_gain:
                bisect.insort(other.cache_points, d)
                return entry, True
        return entry, False

    def _points(self, seq: Request, start: int) -> list[int]:
        cache, prompt = self.kv.cache, seq.prefix
        assert cache is not None and prompt is not None
        if not self.config.chunked_prefill:  # one piece per prompt: no cut inside it
            return [len(prompt)] if len(prompt) > start and cache.get(prompt, len(prompt)) is None else []
        # The requests nearest in the queue are a large enough sample of what is shared: a long queue would
        # otherwise make every admission compare with all of it.
        candidates = [*itertools.islice(self.waiting, BRANCH_SAMPLE), *self.running]
        others = [self._prompt(o) for o in candidates if o is not seq and o.snapshot is None]
        return snapshot_points(cache, prompt, start, others, self.min_gain)

    @property
    def min_gain(self) -> int:
        """A snapshot inside a prompt must save at least a block of computation to be worth its slot."""
        return self.kv.block_size

    def _count_lookup(self, seq: Request, entry: CacheEntry | None) -> None:
        cache = self.kv.cache
        if cache is None or seq.snapshot is not None:
            return
        cache.stats.queries += 1
        cache.stats.query_tokens += seq.prefill_len
        if entry is not None:
            cache.stats.hits += 1
            cache.stats.hit_tokens += entry.position

    def _chunk_len(self, seq: Request, budget: int, first: bool, start: int | None = None) -> int:
        computed = seq.num_computed if start is None else start
        want = seq.num_tokens - computed + (1 if seq.draft is not None else 0)  # a draft is verified in the same step
        if seq.cache_points:
            want = min(want, seq.cache_points[0] - computed)
        if self.config.chunked_prefill:
            return min(want, budget)
        # Whole prompts only; one that exceeds the budget still runs alone so it is never starved.
        return want if want <= budget or first else 0

    def _preempt(self, seq: Request) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.draft = None
        seq.cache_points = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)
