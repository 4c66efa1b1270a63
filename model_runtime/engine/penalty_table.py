"""The penalties' context of running requests, kept on the device and updated in place.

Repetition, presence and frequency penalties need, per row, which tokens its prompt or output holds and how often
each output token occurred. Built from the host's token lists (`sampler.Penalties.build`), that is an upload of
O(context) ids per penalized row every step. The table keeps it on the device instead, one row per penalized
request (`seen` bool and `counts` int32, [rows, vocab]), as SGLang's penalizer keeps its cumulated counts: a row is
filled from the host's lists once, when its request first samples (or when its lists grew in a way the table did
not see), and after each batched draw the drawn tokens go into their rows by one scatter on the device (an MTP
verification step's second token only where its draft was accepted: `record_accepted`). A steady decode step
uploads only the rows' indices.
A step launched before the previous one's tokens reach the host (overlapped scheduling) reads rows that counted
those tokens already, so nothing in it waits for them.

Rows are a cache keyed by request: when they run out, the requests that sampled least recently give theirs up
(one evicted, preempted for long or finished is refilled if it samples again), and when one step needs more rows
than there are, the table doubles. No hook frees a row, so an aborted request holds one only until it is evicted.
The last row is the sink: rows without penalties read it (all zeros: their penalties change nothing) and their
draws write nothing into it. Memory: 5 bytes x vocab a row (0.65 MB at DeepSeek-V4's 129,280 tokens), allocated
at the first penalized request and growing with the most penalized requests of one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampler import Penalties
from dsv4.model_runtime.engine.transfer import to_device

INITIAL_ROWS = 8


@dataclass
class _Entry:
    request: Request
    row: int
    counted: int  # output tokens the row holds
    used: int  # the last sampling call that read it


class PenaltyTable:
    """The device rows of penalized requests (see the module docstring); nothing is allocated before one samples."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self._entries: dict[str, _Entry] = {}
        self._calls = 0

    @property
    def capacity(self) -> int:
        """Rows for requests (the sink not counted)."""
        return max(0, self.seen.shape[0] - 1)

    @property
    def sink(self) -> int:
        return self.capacity

    def rows(
        self, seqs: Sequence[Request], pending: torch.Tensor | None = None, ahead: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """The table row of each of `seqs` ([R] int64 on the device; the sink for rows without penalties), after
        filling the rows of penalized requests the table does not hold up to date. `ahead`: the rows with a token
        already drawn by a step whose tokens have not reached their lists (overlapped scheduling), `pending`
        (device, indexed by row) holding it: [R] one token a row, or [R, 2] a verification row's two draws, the
        second -1 where its draft was rejected; a current row has counted them, a refilled one counts them after
        its lists."""
        self._calls += 1
        ahead = ahead or [False] * len(seqs)
        penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
        stale = [i for i in penalized if not self._current(seqs[i], ahead[i])]
        self._make_room(len(penalized), {seqs[i].request_id for i in penalized})
        free = iter(sorted(set(range(self.capacity)) - {e.row for e in self._entries.values()}))
        for i in stale:
            s = seqs[i]
            old = self._entries.get(s.request_id)
            row = old.row if old is not None else next(free)
            self._entries[s.request_id] = _Entry(s, row, len(s.output_token_ids) + ahead[i], self._calls)
        if stale:
            index = to_device(torch.tensor([self._entries[seqs[i].request_id].row for i in stale]), self.device)
            fresh = Penalties.build([seqs[i] for i in stale], self.vocab, self.device)
            self.seen[index] = fresh.seen
            self.counts[index] = fresh.counts
            late = [i for i in stale if ahead[i]]
            if late:
                assert pending is not None, "rows ahead of their lists need the tokens on their way"
                rows = to_device(torch.tensor([self._entries[seqs[i].request_id].row for i in late]), self.device)
                tokens = pending[to_device(torch.tensor(late), self.device)]
                for column in tokens.view(len(late), -1).unbind(1):
                    self._count(torch.where(column >= 0, rows, self.sink), column.clamp(min=0))
        for i in penalized:
            self._entries[seqs[i].request_id].used = self._calls
        table = [self._entries[s.request_id].row if s.params.penalized else self.sink for s in seqs]
        return to_device(torch.tensor(table, dtype=torch.int64), self.device)

    def penalties(self, rows: torch.Tensor, seqs: Sequence[Request]) -> Penalties:
        """The `Penalties` of `seqs` read from their `rows`."""
        return Penalties(self.seen[rows], self.counts[rows], Penalties.values_of(seqs, self.device))

    def record(self, rows: torch.Tensor, tokens: torch.Tensor, seqs: Sequence[Request]) -> None:
        """Count the tokens [R] (device) just drawn for `seqs` into their `rows`, which the caller appends to their
        outputs next (the sink's rows write nothing)."""
        self._count(rows, tokens)
        for s in seqs:
            if s.params.penalized:
                self._entries[s.request_id].counted += 1

    def record_accepted(self, rows: torch.Tensor, tokens: torch.Tensor, accepted: torch.Tensor) -> None:
        """Count the second tokens [R] (device) of a verification step into `rows` where their draft was
        `accepted` [R] (device); the host reports each one it appends with `appended`."""
        self._count(torch.where(accepted, rows, self.sink), tokens)

    def appended(self, seq: Request) -> None:
        """`seq` appended the second token of a verification step, which `record_accepted` counted."""
        if seq.params.penalized:
            self._entries[seq.request_id].counted += 1

    def _count(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        live = rows != self.sink
        self.counts.index_put_((rows, tokens), live.to(torch.int32), accumulate=True)
        self.seen.index_put_((rows, tokens), live)

    def _current(self, s: Request, ahead: bool) -> bool:
        entry = self._entries.get(s.request_id)
        return entry is not None and entry.request is s and entry.counted == len(s.output_token_ids) + ahead

    def _make_room(self, needed: int, keep: set[str]) -> None:
        """Room for `needed` rows held by the requests of `keep`: evict the least recently used other requests,
        and grow when that is not enough."""
        held = len([k for k in self._entries if k in keep])
        others = sorted((e.used, k) for k, e in self._entries.items() if k not in keep)
        while others and len(self._entries) - held + needed > self.capacity:
            del self._entries[others.pop(0)[1]]
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity, INITIAL_ROWS))

    def _grow(self, capacity: int) -> None:
        seen = torch.zeros(capacity + 1, self.vocab, dtype=torch.bool, device=self.device)
        counts = torch.zeros(capacity + 1, self.vocab, dtype=torch.int32, device=self.device)
        seen[: self.capacity] = self.seen[: self.capacity]
        counts[: self.capacity] = self.counts[: self.capacity]
        self.seen, self.counts = seen, counts
