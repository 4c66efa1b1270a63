"""A rank group's engine: rank 0 (the leader) runs the real `LLMEngine`; every other rank (a follower) keeps a
mirror of its group's KV pool and replays its model calls on its own shard, so the collectives of the sharded
layers (`shard.py`) line up.

* The leader owns everything with a decision in it: the scheduler, the block and slot allocation, the prefix
  cache, the sampler, the tokenizer, and in a worker Redis, the handoff and /metrics. Its `LeaderRunner` sends
  every model call of a step to the followers before making it: the batched decode step (`DecodeCall`: the
  step's rows of token, position and slot, and its block tables) or one per-sequence feed (`FeedCall`: the ids,
  each row's slot, blocks and position, and which rows need logits). Sampling needs no collective (the head
  gathers the full vocabulary on every rank), so it runs on the leader alone and the followers learn the tokens
  from the next call's ids, or, for a decode step launched before they reach the leader's host (overlapped
  scheduling, `LLMEngine.step`), from the leader's device: such a call carries each row's place in the step's fed
  tokens instead, which the leader broadcasts on the default group before the step (`_from_leader`), so no rank's
  host waits for the tokens between two steps.
* Data-parallel attention (`data_parallel.py`, layouts of dp > 1 tensor-parallel groups): each group's pool holds
  its own sequences. The leader schedules every group's pool and prefix cache (`kv_groups.GroupKV`: a new sequence
  resumes in the group holding its longest cached prefix, else goes to the group with the most free blocks) and
  splits each call into one part per group (a group may have none: it still
  takes part in the MoE's exchange); every rank runs its group's part, and the logits of all groups' rows are
  gathered for the leader's sampler.
* Pool writes outside the forward pass travel with the next call, in order, to the ranks of the group they belong
  to (`KVPool.journal`): slot resets, the prefix cache's slot and block copies, and restored imports (the verified
  snapshot itself). Allocation and frees write nothing: a follower's pool is storage addressed by the leader's
  block and slot ids for its group.
* KV export needs no gather: the sharding keeps K=V, the compressors and the indexer whole on every rank (only
  query heads, output groups, experts and the vocabulary are split), so every rank of a group holds the whole
  state of the group's sequences. The leader exports its own group's sequences; another group's first rank
  exports its sequence and sends the chunks to the leader (`ExportCall`). The blob (`kv_export`, fingerprinted
  without the layout) imports into any layout; an import is restored on every rank of the group it goes to.
* Failures: a follower that dies or fails a call ends the group through the launcher (`launch.py`). A model call
  that fails on the leader after its followers were sent it leaves them inside a collective, and a call that cannot
  be sent means a follower is gone: either way the leader logs one line and exits (the callers' requests are not
  failed: their jobs are taken over), and the launcher ends the group, rather than serve from ranks out of step.

MTP speculative decoding: a verification step is split between the groups like a decode step (`VerifyCall`, one
part per group: its rows with their drafts and its block tables); every rank runs its group's part (the MoE over
both tokens of every group's rows), the logits of every group's rows are gathered for the leader's sampler, and
the step's draws reach every rank from the leader's device (one broadcast, as the fed tokens above), with which
each group runs the MTP over its rows (its MoE exchanged between the groups again: a group without rows takes
part with none) and takes back its rejected drafts' pool writes; the next drafts are gathered for the leader. The
MTP calls after per-sequence feeds (`MtpCall`) name, per group, rows of the streams its ranks kept from this
step's feeds (a group without rows in a feed keeps an empty entry, so the leader's call numbers hold on every
rank).

Batched decode steps replay device graphs in a rank group as in one process: the leader pads the step's block
tables to its graph's width before sending it, every rank pads the rows to its graph's batch bucket, and so every
rank captures its own graph of that shape at the same call (the warm-up and capture steps run the model's
collectives on every rank alike; NCCL / HCCL inside a capture: not run on hardware). Under data-parallel attention
the shape is the whole call's, as SGLang pads its DP ranks: every group's tables get the widest group's width and
every group pads to the bucket of the largest group's rows, a group without rows included (it replays a step of
padding rows instead of `idle_pass`), so the MoE's exchange between the groups has the same sizes in every replay.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from dsv4.model_runtime.engine.cuda_graphs import batch_bucket
from dsv4.model_runtime.engine.kv_groups import GroupKV, pool_index
from dsv4.model_runtime.engine.kv_state import KVPool, PagedSequenceState, PoolWrite
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.model_runner import ModelRunner, MtpInput, StreamRef
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.speculative import VerifyStep
from dsv4.model_runtime.engine.step_inputs import DRAFT, DecodeInputs, verify_tokens
from dsv4.model_runtime.engine.transfer import to_device
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.data_parallel import DataParallel
from dsv4.model_runtime.parallel.rank import RankContext
from dsv4.model_runtime.parallel.shard import idle_pass
from dsv4.model_runtime.parallel.step_channel import StepChannel
from dsv4.model_runtime.placement import Layout
from dsv4.model_runtime.state import SequenceState
from dsv4.model_runtime.tokenizer import Tokenizer

log = logging.getLogger("dsv4.model_runtime.parallel")

T = TypeVar("T")

BROKEN_EXIT = 70  # the leader's exit status when a call failed after its followers were sent it


Described = tuple[int, tuple[int, ...], int, int]  # a paged state: slot, blocks, position, MTP position


@dataclass(frozen=True)
class DecodeCall:
    """A group's part of the batched decode step: `DecodeInputs.rows` [D, 3] and `block_tables` [D, T], on the
    CPU (D = 0: the group has no row in it). `fed` (overlapped scheduling): the places of the part's rows in the
    tokens the step feeds, which the leader broadcasts from its device (`_from_leader`), their ids in `rows` being
    stale; None: `rows` holds the ids. Every part of a fed step has one."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    fed: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.rows.shape[0])

    @property
    def logit_rows(self) -> int:
        return self.tokens


@dataclass(frozen=True)
class FeedCall:
    """A group's part of a per-sequence feed: ids [B, n] (CPU); per row its state; the rows that need logits
    (B = 0: the group has no row in it)."""

    ids: torch.Tensor
    states: list[Described]
    rows: list[int]

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def logit_rows(self) -> int:
        return len(self.rows)


Call = tuple[DecodeCall, ...] | tuple[FeedCall, ...]  # one part per data-parallel group, in group order


@dataclass(frozen=True)
class ExportCall:
    """Export the KV state of a sequence of data-parallel group `group` (its slot, blocks and positions, its MTP
    draft): that group's first rank sends the blob's chunks to the leader."""

    group: int
    slot: int
    blocks: tuple[int, ...]
    position: int
    chunk_size: int
    mtp_position: int = 0
    draft: int | None = None


@dataclass(frozen=True)
class VerifyPart:
    """A group's part of an MTP verification step: `DecodeInputs.rows` [B, 4] (with the drafts) and `block_tables`
    [B, T], on the CPU (B = 0: the group has no row in it). `fed` (overlapped scheduling): the places of the part's
    rows in the step's fed rows (`DecodeInputs.verifying`: token, positions to add, draft), which the leader
    broadcasts from its device; every part of a fed step has one."""

    rows: torch.Tensor
    block_tables: torch.Tensor
    fed: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.rows.shape[0])


@dataclass(frozen=True)
class VerifyCall:
    """An MTP verification step: one part per data-parallel group, in group order; the step's draws follow by
    broadcast (`_from_leader`)."""

    parts: tuple[VerifyPart, ...]


@dataclass(frozen=True)
class MtpPart:
    """A group's part of one MTP call (`forward_mtp`): rows of the streams its ranks kept from this step's feeds
    ((feed call, row in the group's part of it)), the tokens after them [b, k] (CPU), the states. `fed` (a
    launched step): the places of the part's rows in the call's fed last tokens (`MtpInput`), which the leader
    broadcasts from its device; every part of a fed call has one."""

    refs: list[StreamRef]
    ids: torch.Tensor
    states: list[Described]
    fed: torch.Tensor | None = None


@dataclass(frozen=True)
class MtpCall:
    """The step's MTP calls, each with one part per data-parallel group, in group order."""

    calls: list[tuple[MtpPart, ...]]


@dataclass(frozen=True)
class Stop:
    """The leader is done: followers return."""


Published = Call | VerifyCall | ExportCall | MtpCall | Stop


@dataclass(frozen=True)
class Message:
    """Each data-parallel group's pool writes since the previous message, then one call."""

    writes: list[list[PoolWrite]]
    call: Published


def run_call(
    runner: ModelRunner,
    pool: KVPool,
    call: Call,
    group: int,
    dp: DataParallel | None,
    states: list[SequenceState] | None = None,
    feed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run this rank's part of a model call (`group`'s part, over its `pool`; a feed's `states`, else rebuilt from
    the call), and return the logits of every group's rows that need them, in group order (None: no row does).
    A group without rows in the call takes part in the exchanges between the groups with none; with graphs, every
    group runs a decode step padded to the bucket of the largest group's rows (`DecodeGraphs.run`). `feed`: on the
    leader, the tokens [D] (device) a fed decode step feeds, in the order of the parts' `fed` places."""
    model = runner.model
    part = call[group]
    fed = None
    if isinstance(part, DecodeCall) and part.fed is not None:
        fed = _from_leader(feed, (sum(p.tokens for p in call),), model.device)[to_device(part.fed, model.device)]
    bucket = _padded_bucket(runner, [p.tokens for p in call], dp) if isinstance(part, DecodeCall) else None
    _set_rows(dp, [p.tokens for p in call], bucket)
    own: torch.Tensor | None = None
    if part.tokens == 0 and bucket is None:
        if dp is not None:
            idle_pass(model, dp)
        if isinstance(part, FeedCall):  # MTP's stream refs number the step's feed calls on every rank alike
            runner.keep_streams(torch.empty(0, device=model.device))
    elif isinstance(part, DecodeCall):
        inputs = DecodeInputs(to_device(part.rows, model.device), to_device(part.block_tables, model.device))
        own = ModelRunner.run_decode(runner, inputs if fed is None else inputs.feeding(fed), pool, bucket)
    else:
        if states is None:
            states = [_state(pool, *described) for described in part.states]
        _, own = ModelRunner.forward_feed(runner, part.ids, states, part.rows)
    if dp is None:
        return own
    counts = [p.logit_rows for p in call]
    if not sum(counts):
        return None
    dp.set_rows(counts)
    if own is None:
        dtype = torch.promote_types(model.dtype, torch.float32)
        own = torch.zeros(0, model.cfg.vocab_size, dtype=dtype, device=model.device)
    return dp.gather(own)


def _padded_bucket(runner: ModelRunner, counts: list[int], dp: DataParallel | None) -> int | None:
    """The batch bucket every group pads a graphed step to under data-parallel attention (that of the largest
    group's rows, so every rank replays one shape); None: each runs its own rows."""
    return batch_bucket(max(counts)) if dp is not None and runner.cuda_graphs else None


def _set_rows(dp: DataParallel | None, counts: list[int], bucket: int | None = None, per_row: int = 1) -> None:
    """Tell the data-parallel exchanges each group's tokens in the next model call: `per_row` per row of `counts`,
    or of `bucket` rows in every group when the groups replay padded graphs."""
    if dp is not None:
        dp.set_rows([per_row * (bucket if bucket is not None else n) for n in counts])


def start_verify(
    runner: ModelRunner,
    pool: KVPool,
    call: VerifyCall,
    group: int,
    dp: DataParallel | None,
    feed: torch.Tensor | None = None,
) -> tuple[VerifyStep | None, torch.Tensor]:
    """This rank's part of a verification step's model call: its group's step (None: the group has no rows and
    replays no padded graph; it took part in the MoE's exchange with none) and the logits [R, 2, vocab] of every
    group's rows, in group order. `feed`: on the leader, the fed rows [R, 3] (device) of a fed step, in the order
    of the parts' `fed` places."""
    model, device = runner.model, runner.model.device
    part = call.parts[group]
    counts = [p.count for p in call.parts]
    fed = None
    if part.fed is not None:
        fed = _from_leader(feed, (sum(counts), 3), device)[to_device(part.fed, device)]
    bucket = _padded_bucket(runner, counts, dp)
    _set_rows(dp, counts, bucket, per_row=2)
    step: VerifyStep | None = None
    if part.count or bucket is not None:
        inputs = DecodeInputs(to_device(part.rows, device), to_device(part.block_tables, device))
        step = ModelRunner.forward_verify(runner, inputs if fed is None else inputs.verifying(fed), pool, bucket)
    elif dp is not None:
        idle_pass(model, dp)
    if dp is None:
        assert step is not None
        return step, step.logits
    dtype = torch.promote_types(model.dtype, torch.float32)
    own = step.logits if step is not None else torch.zeros(0, 2, model.cfg.vocab_size, dtype=dtype, device=device)
    _set_rows(dp, counts, per_row=2)
    return step, dp.gather(own.flatten(0, 1)).view(-1, 2, own.shape[-1])


def finish_verify(
    runner: ModelRunner,
    call: VerifyCall,
    group: int,
    dp: DataParallel | None,
    step: VerifyStep | None,
    draws: torch.Tensor,
) -> torch.Tensor:
    """This rank's part of a verification step's end, with the step's draws [R, 2] of every group's rows (group
    order, device): the group's MTP and undo (`ModelRunner.finish_verify`); returns the next drafts [R] of every
    group's rows, in group order."""
    counts = [p.count for p in call.parts]
    first = sum(counts[:group])
    _set_rows(dp, counts, _padded_bucket(runner, counts, dp), per_row=2)
    if step is not None:
        own = ModelRunner.finish_verify(runner, step, draws[first : first + counts[group]])
    else:
        assert dp is not None
        idle_pass(runner.model, dp, mtp=True)
        own = draws.new_zeros(0)
    if dp is None:
        return own
    _set_rows(dp, counts)
    return dp.gather(own)


def run_mtp(
    runner: ModelRunner,
    pool: KVPool,
    call: MtpCall,
    group: int,
    dp: DataParallel | None,
    states: list[list[SequenceState]] | None = None,
    feeds: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """This rank's part of a step's MTP calls (its group's parts over its `pool`; per call the `states` of the
    part, else rebuilt from it): per call the logits [R, 1, vocab] of every group's rows, in group order. The
    step's kept streams are dropped after them. `feeds`: on the leader, each fed call's last tokens [R] (device,
    -1 where the host's id stands), in the order of the parts' `fed` places."""
    model, device = runner.model, runner.model.device
    out = []
    for n, parts in enumerate(call.calls):
        part = parts[group]
        fed = None
        if part.fed is not None:
            total = sum(p.ids.shape[0] for p in parts)
            fed = _from_leader(feeds[n] if feeds is not None else None, (total,), device)[to_device(part.fed, device)]
        _set_rows(dp, [p.ids.numel() for p in parts])
        if part.refs:
            mine: list[SequenceState] = states[n] if states is not None else [_state(pool, *d) for d in part.states]
            own = ModelRunner.mtp_rows(runner, part.refs, part.ids, mine, fed)
        else:
            assert dp is not None, "an MTP call without rows"
            idle_pass(model, dp, mtp=True)
            dtype = torch.promote_types(model.dtype, torch.float32)
            own = torch.zeros(0, 1, model.cfg.vocab_size, dtype=dtype, device=device)
        if dp is not None:
            _set_rows(dp, [len(p.refs) for p in parts])
            own = dp.gather(own)
        out.append(own)
    runner.clear_streams()
    return out


def _from_leader(t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The leader's int64 device tensor `t` of `shape` on every rank (the followers pass None): tokens a fed step
    feeds, drawn by the step before and still on their way to the leader's host, or a verification step's draws.
    One collective on the default group, queued on the device behind the draw like the model's own: no rank's host
    waits for them (NCCL / HCCL: not run on hardware)."""
    t = torch.empty(shape, dtype=torch.int64, device=device) if t is None else t.to(torch.int64).contiguous()
    dist.broadcast(t, src=0)
    return t


def _in_order(rows: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Rows `rows` [n, ...] put at the places `targets` [n] (a permutation of range(n))."""
    out = torch.empty_like(rows)
    out[torch.tensor(targets, dtype=torch.long, device=rows.device)] = rows
    return out


class LeaderRunner(ModelRunner):
    """Rank 0's model runner: every model call goes to the followers first, with each group's pool writes before
    it; under data-parallel attention (`dp`) each call is split by the group whose pool holds each sequence
    (`pools`, in group order: the leader's own, then the other groups' bookkeeping)."""

    def __init__(
        self,
        model: DeepseekV4,
        pools: list[KVPool],
        channel: StepChannel,
        dp: DataParallel | None,
        use_mtp: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__(model, use_mtp=use_mtp, cuda_graphs=cuda_graphs)
        self.pools, self.channel, self.dp = pools, channel, dp
        self._feed_places: list[list[tuple[int, int]]] = []  # per feed call of the step: each row's (group, row)
        for pool in pools:
            pool.journal = []
            pool.mirror_block_tables()  # each step's tables are sent from the host copy: no wait for the device

    def _group(self, state: SequenceState | None) -> int:
        assert isinstance(state, PagedSequenceState), "a rank group's sequences live in the paged pool"
        return pool_index(self.pools, state)

    def _publish(self, call: Published) -> None:
        writes = []
        for pool in self.pools:
            writes.append(pool.journal or [])
            pool.journal = []
        self.channel.publish(Message(writes, call))

    def _call(self, call: Published, make: Callable[[], T]) -> T:
        """Send `call` to the followers, then make it here; a failure of either ends the group (`_broken`)."""
        try:
            self._publish(call)
            return make()
        except Exception as e:
            _broken(e)

    def _by_group(self, states: Sequence[SequenceState | None]) -> list[list[int]]:
        """The indices of `states` in each data-parallel group, in group order."""
        by_group: list[list[int]] = [[] for _ in self.pools]
        for i, st in enumerate(states):
            by_group[self._group(st)].append(i)
        return by_group

    def _parts(
        self, seqs: list[Request], by_group: list[list[int]], tokens: int, drafts: bool, fed: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each group's part of a batched step of `seqs` writing up to `tokens` positions a row (`drafts`: a
        verification step's rows, with their drafts), on the host: its `DecodeInputs` rows and block tables, and
        with `fed` its rows' places in the step's fed rows. With graphs every group's tables share the widest
        group's width: one graph shape on every rank."""
        shared = self.decode_width(seqs, self.pools[0], tokens) if self.cuda_graphs else 0
        parts = []
        for pool, rows in zip(self.pools, by_group, strict=True):
            mine = [seqs[i] for i in rows]
            places = torch.tensor(rows, dtype=torch.int64) if fed else None
            if not mine:
                width = 4 if drafts else 3
                parts.append(
                    (torch.zeros(0, width, dtype=torch.int64), torch.zeros(0, shared, dtype=torch.int32), places)
                )
                continue
            pool.flush_block_tables()
            inputs = DecodeInputs.on_host(mine, pool, shared or self.decode_width(mine, pool, tokens), drafts, fed)
            parts.append((inputs.rows, inputs.block_tables, places))
        return parts

    def decode_logits(self, seqs: list[Request], feed: torch.Tensor | None = None) -> torch.Tensor:
        by_group = self._by_group([s.state for s in seqs])
        call = tuple(DecodeCall(*part) for part in self._parts(seqs, by_group, 1, False, feed is not None))
        if feed is not None:
            feed = feed.to(torch.int64).contiguous()  # what the followers' receiving buffers hold
        logits = self._call(call, lambda: run_call(self, self.pools[0], call, 0, self.dp, feed=feed))
        assert logits is not None
        return _in_order(logits, [i for rows in by_group for i in rows])

    def forward_feed(
        self, ids: torch.Tensor, states: list[SequenceState], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        by_group = self._by_group(states)
        places: list[tuple[int, int]] = [(0, 0)] * len(states)
        for g, members in enumerate(by_group):
            for local, i in enumerate(members):
                places[i] = (g, local)
        if self.use_mtp:  # what `forward_mtp` maps the step's stream refs by
            self._feed_places.append(places)
        needed = set(rows)
        parts = []
        for members in by_group:
            logit_rows = [k for k, i in enumerate(members) if i in needed]
            parts.append(FeedCall(ids[members], _describe([states[i] for i in members]), logit_rows))
        call = tuple(parts)
        own = [states[i] for i in by_group[0]]
        logits = self._call(call, lambda: run_call(self, self.pools[0], call, 0, self.dp, own))
        for members in by_group[1:]:  # computed by their groups' ranks
            for i in members:
                states[i].position += ids.shape[1]
        # The streams' one reader, MTP, takes them from each rank's runner (`ModelRunner.keep_streams`, its group's
        # rows: `forward_mtp` maps the rows to the groups), so none are returned.
        streams = torch.empty(0, device=ids.device)
        if logits is None:
            return streams, None
        where = {i: k for k, i in enumerate(rows)}
        return streams, _in_order(logits, [where[i] for members in by_group for i in members if i in needed])

    def verify_logits(self, seqs: list[Request], fed: torch.Tensor | None = None) -> VerifyStep:
        by_group = self._by_group([s.state for s in seqs])
        parts = self._parts(seqs, by_group, verify_tokens(fed), True, fed is not None)
        call = VerifyCall(tuple(VerifyPart(*part) for part in parts))
        feed = None if fed is None else fed.to(torch.int64).contiguous()
        step, logits = self._call(call, lambda: start_verify(self, self.pools[0], call, 0, self.dp, feed))
        order = [i for rows in by_group for i in rows]  # the sequence of each row in group order
        device = self.model.device
        where = to_device(torch.tensor(order, dtype=torch.long), device)
        if feed is not None:
            drafts = feed[:, 2]
        else:
            drafts = _in_order(to_device(torch.cat([p.rows[:, DRAFT] for p in call.parts]), device), order)

        def finish(tokens: torch.Tensor) -> torch.Tensor:
            try:
                draws = _from_leader(tokens[where], tuple(tokens.shape), device)
                return _in_order(finish_verify(self, call, 0, self.dp, step, draws), order)
            except Exception as e:  # the followers are inside the step's collectives
                _broken(e)

        return VerifyStep(_in_order(logits, order), drafts, finish)

    def forward_mtp(self, calls: list[MtpInput]) -> list[torch.Tensor]:
        parts: list[tuple[MtpPart, ...]] = []
        own: list[list[SequenceState]] = []
        orders: list[list[int]] = []
        feeds: list[torch.Tensor | None] = []
        for refs, ids, states, fed in calls:
            places = [self._feed_places[c][r] for c, r in refs]
            by_group: list[list[int]] = [[] for _ in self.pools]
            for item, (g, _) in enumerate(places):
                by_group[g].append(item)
            parts.append(
                tuple(
                    MtpPart(
                        [(refs[i][0], places[i][1]) for i in items],
                        ids[items],
                        _describe([states[i] for i in items]),
                        None if fed is None else torch.tensor(items, dtype=torch.int64),
                    )
                    for items in by_group
                )
            )
            own.append([states[i] for i in by_group[0]])
            orders.append([i for items in by_group for i in items])
            feeds.append(None if fed is None else fed.to(torch.int64).contiguous())
            for items in by_group[1:]:  # computed by their groups' ranks
                for i in items:
                    states[i].mtp_position += ids.shape[1]
        call = MtpCall(parts)
        self._feed_places = []
        out = self._call(call, lambda: run_mtp(self, self.pools[0], call, 0, self.dp, own, feeds))
        return [_in_order(logits, order) for logits, order in zip(out, orders, strict=True)]

    def export_chunks(self, state: SequenceState, chunk_size: int, draft: int | None = None) -> list[bytes]:
        group = self._group(state)
        if group == 0:
            return super().export_chunks(state, chunk_size, draft)
        assert isinstance(state, PagedSequenceState) and self.dp is not None
        call = ExportCall(group, state.slot, tuple(state.table), state.position, chunk_size, state.mtp_position, draft)
        first = group * self.dp.layout.tp
        chunks: list[bytes] = self._call(call, lambda: self.channel.receive_from(first))
        return chunks

    def stop(self) -> None:
        """End the followers' loops (they return from `RankEngine.follow`)."""
        self._publish(Stop())


def _broken(error: Exception) -> NoReturn:
    # Exiting, not raising: an exception would reach the engine's callers, which would fail their requests to the
    # clients, while a group that is gone should leave its jobs to the workers that take them over.
    log.critical(
        "rank group: a model call failed on the leader or could not reach its followers (%s: %s); ending the group",
        type(error).__name__,
        error,
        exc_info=error,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(BROKEN_EXIT)


@dataclass
class RankEngine:
    """This rank's part of a group's engine: on the leader `engine` is the engine to serve from (its runner sends
    every call to the followers); on a follower it only holds the model and its group's pool, for `follow`."""

    ctx: RankContext
    engine: LLMEngine
    channel: StepChannel
    dp: DataParallel | None = None

    @property
    def is_leader(self) -> bool:
        return self.ctx.is_leader

    def follow(self) -> None:
        """A follower's loop: apply the leader's pool writes to this group's pool and run this group's part of its
        model calls until it stops."""
        # The same runner calls the leader makes, so both sides run one definition of each call.
        model, pool, runner = self.engine.model, self.engine.kv.pool, self.engine.runner
        group = self.dp.group if self.dp is not None else 0
        with torch.no_grad():
            while True:
                message: Message = self.channel.receive()
                for write in message.writes[group]:
                    _apply(model, pool, write)
                call = message.call
                if isinstance(call, Stop):
                    return
                if isinstance(call, MtpCall):
                    run_mtp(runner, pool, call, group, self.dp)
                elif isinstance(call, ExportCall):
                    if call.group == group and self.dp is not None and self.ctx.rank == group * self.dp.layout.tp:
                        state = _state(pool, call.slot, call.blocks, call.position, call.mtp_position)
                        self.channel.send_to_leader(runner.export_chunks(state, call.chunk_size, call.draft))
                elif isinstance(call, VerifyCall):
                    step, _ = start_verify(runner, pool, call, group, self.dp)
                    draws = _from_leader(None, (sum(p.count for p in call.parts), 2), model.device)
                    finish_verify(runner, call, group, self.dp, step, draws)
                else:
                    run_call(runner, pool, call, group, self.dp)

    def stop(self) -> None:
        """The leader is done stepping: end the followers' loops."""
        runner = self.engine.runner
        assert isinstance(runner, LeaderRunner), "only the leader stops the group"
        runner.stop()


def _state(
    pool: KVPool, slot: int, blocks: tuple[int, ...], position: int, mtp_position: int = 0
) -> PagedSequenceState:
    state = PagedSequenceState(pool, slot)
    state.table.extend(blocks)
    state.position, state.mtp_position = position, mtp_position
    return state


def _describe(states: list[SequenceState]) -> list[Described]:
    out = []
    for st in states:
        assert isinstance(st, PagedSequenceState), "a rank group's sequences live in the paged pool"
        out.append((st.slot, tuple(st.table), st.position, st.mtp_position))
    return out


def _apply(model: DeepseekV4, pool: KVPool, write: PoolWrite) -> None:
    """Replay one of the leader's pool writes on this follower's pool."""
    op, *args = write
    if op == "restore":
        snapshot, slot, blocks = args
        from dsv4.model_runtime.engine import kv_export  # needs crc32c (as the leader's import did)

        kv_export.restore(model, snapshot, _state(pool, slot, blocks, 0))
    elif op in ("reset_slot", "copy_slot", "copy_block"):
        getattr(pool, op)(*args)
    else:
        raise ValueError(f"rank group: unknown pool write {op!r}")


def load_rank_engine(
    ctx: RankContext,
    path: str | Path,
    layout: Layout,
    dtype: torch.dtype = torch.float32,
    config: EngineConfig | None = None,
    qat_simulation: bool = True,
) -> RankEngine:
    """Load this rank's shard of `layout` and build its part of the group's engine (every rank calls this at the
    same point: it creates the step channel's process group and sizes the KV pool with the group)."""
    if layout.world != ctx.world_size:
        raise ValueError(f"layout {layout.describe()} does not match the group's {ctx.world_size} ranks")
    from dsv4.model_runtime.weights import load_rank

    cfg = config or EngineConfig()
    channel = StepChannel()
    dp = DataParallel.create(layout, ctx.rank) if layout.dp > 1 else None
    model, _ = load_rank(path, layout, ctx.rank, ctx.device, dtype, qat_simulation, data_parallel=dp)
    tokenizer = Tokenizer.from_pretrained(path) if ctx.is_leader else None
    engine = LLMEngine(model, tokenizer, cfg, kv_groups=layout.dp if ctx.is_leader else 1)
    if ctx.is_leader:
        kv = engine.kv
        pools = kv.pools if isinstance(kv, GroupKV) else [kv.pool]
        graphs = engine.runner.cuda_graphs  # what the engine made of the config on this device
        engine.runner = LeaderRunner(model, pools, channel, dp, use_mtp=cfg.speculative_mtp, cuda_graphs=graphs)
    # Every rank has loaded before any returns: a leader that reports ready serves with a whole group.
    dist.barrier()
    log.info(
        "rank %d of %d: %s engine ready (%s)",
        ctx.rank,
        ctx.world_size,
        "leader" if ctx.is_leader else "follower",
        layout.describe(),
    )
    return RankEngine(ctx, engine, channel, dp)
