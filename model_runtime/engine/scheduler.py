"""Continuous batching: which sequences run this step and how many of their tokens (chunked prefill).

Every step takes the running sequences first (one token for a decoding sequence, a chunk of the remaining
prompt for a prefilling one), then admits waiting sequences in arrival order while the token budget, the
sequence limit and the KV pool allow. A running sequence that cannot grow preempts the most recently admitted
one: its state is freed and it goes back to the front of the queue, to be recomputed (never a crash).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsv4.model_runtime.engine.kv_state import KVCacheManager
from dsv4.model_runtime.engine.request import Request, RequestStatus


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
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config, self.kv = config, kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

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

    def schedule(self) -> list[ScheduledChunk]:
        """The chunks to run this step; each chunk's KV capacity is reserved."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted by an earlier sequence of this loop
                continue
            n = self._chunk_len(seq, budget, first=not chunks)
            if n == 0:
                continue
            while not self.kv.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.kv.grow(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = self._chunk_len(seq, budget, first=not chunks)
            if n == 0 or not self.kv.can_grow(seq, n):
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            self.kv.grow(seq, n)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    def _chunk_len(self, seq: Request, budget: int, first: bool) -> int:
        want = seq.num_uncomputed + (1 if seq.draft is not None else 0)  # an MTP draft is verified in the same step
        if self.config.chunked_prefill:
            return min(want, budget)
        # Whole prompts only; one that exceeds the budget still runs alone so it is never starved.
        return want if want <= budget or first else 0

    def _preempt(self, seq: Request) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.draft = None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)
