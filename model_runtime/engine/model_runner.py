"""Runs one scheduled step through the model and samples the sequences whose tokens are all computed.

Decoding sequences (one token each, paged state, no MTP) share the batched decode step: `DecodeInputs` on the
device, `DeepseekV4.decode_paged` over the paged pool (replayed from a CUDA graph when enabled), no host sync and
no per-row work. Other chunks go through the per-sequence path, grouped by length because it advances every row
of a call by the same number of tokens: prefill chunks of equal length share a call. Every row that samples this
step, from either path, is sampled in one batched call whose result reaches the host in the step's one copy.
MTP verification (last token + draft, `speculative.py`) is a batched step of its own over the same pool: two
tokens per row, both draws in one sampling call, the rejected drafts' pool writes taken back and the MTP's next
drafts computed on the device, all in one copy to the host.

A step is run in two halves: `launch` runs it and queues the copies of its draws, `land` waits for them and
appends the tokens. Without overlapped scheduling the engine lands each step at once. With it (`LLMEngine.step`)
the next step is launched before the tokens reach the host, its decode rows fed them from the device, its
verification rows their tokens, positions and drafts (`LaunchedVerify.fed`); the MTP over a prompt's chunks pairs
the last position with the token drawn in the same step on the device, and a row that caught up keeps its draft
there (`LaunchedStep.drafts`) for its first verification.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dsv4.model_runtime.engine import speculative
from dsv4.model_runtime.engine.cuda_graphs import GRAPH_DEVICES, DecodeGraphs, width_bucket
from dsv4.model_runtime.engine.kv_state import KVPool, PagedSequenceState
from dsv4.model_runtime.engine.penalty_table import PenaltyTable
from dsv4.model_runtime.engine.request import Request, TokenLogprob
from dsv4.model_runtime.engine.sampler import (
    Penalties,
    SampleRequest,
    SamplingInputs,
    sample_batch,
    sampled_tokens,
    unpack,
)
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.scheduler import ScheduledChunk
from dsv4.model_runtime.engine.speculative import VerifyStep
from dsv4.model_runtime.engine.step_inputs import DecodeInputs, next_token, table_width, verify_tokens
from dsv4.model_runtime.engine.transfer import HostCopy, start_copy_to_host, to_device
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import SequenceState

StreamRef = tuple[int, int]  # (index of a model call of this step, row of its streams)
MtpWork = tuple[Request, StreamRef, int, int]  # an MTP step to run: sequence, its streams, first position, positions
# One MTP call: rows of this step's streams [B] of k positions, the tokens after them [B, k] on the host, the states,
# and `fed` [B] (device, -1 where the host's id stands): the last column's tokens of a launched step's rows that
# caught up with their prompts, drawn by this step and still on their way to the host.
MtpInput = tuple[list[StreamRef], torch.Tensor, list[SequenceState], torch.Tensor | None]


def _request(seq: Request, pending: bool = False) -> SampleRequest:
    """The sampler's view of `seq`'s next draw, one token after those it holds when one is `pending` (drawn, not
    landed yet)."""
    index = seq.num_generated + pending
    return SampleRequest(seq.params, seq.seed, index, seq.prompt_token_ids, seq.output_token_ids)


@dataclass
class LaunchedVerify:
    """The MTP verification rows of a launched step: `seqs` are advanced by one token each (the accepted draft's
    token, when there is one, is counted when they land) and hold neither their drawn tokens nor their next
    drafts yet."""

    seqs: list[Request]
    # [V, 3] int64 on the device, per row: the token its next step feeds (the draft's when accepted, else the first
    # draw), how many positions beyond the host's count that token stands (1 when the draft was accepted, else 0),
    # and its next draft: what a verification step launched before these land feeds from the device.
    fed: torch.Tensor
    pending: torch.Tensor  # [V, 2] the draws a row's list will get: the first, the second or -1 (draft rejected)
    result: HostCopy  # the 2V draws, then the V acceptances and the V next drafts as id rows (`_with_ids`)
    params: list[SamplingParams]
    rows: dict[Request, int] = field(init=False)  # each of `seqs`' row in `fed`

    def __post_init__(self) -> None:
        self.rows = {s: row for row, s in enumerate(self.seqs)}


@dataclass
class LaunchedStep:
    """A step launched without waiting for its tokens (`ModelRunner.launch`): its sequences are advanced, and
    `seqs`, the decode and per-sequence rows that drew a token, do not hold it yet; nor do its verification rows
    (`verify`)."""

    seqs: list[Request]
    tokens: torch.Tensor  # the drawn ids [R] on the device: what the next step of these rows feeds
    # `sample_batch`'s result on its way to the host, then the MTP's drafts of `drafted` as id rows (`_with_ids`);
    # None: only verification rows drew
    result: HostCopy | None
    params: list[SamplingParams]
    verify: LaunchedVerify | None = None
    drafted: list[Request] = field(default_factory=list)  # rows of `seqs` that caught up with the MTP on
    drafts: torch.Tensor | None = None  # [len(drafted)] their MTP drafts, on the device
    rows: dict[Request, int] = field(init=False)  # each of `seqs`' row in `tokens`

    def __post_init__(self) -> None:
        self.rows = {s: row for row, s in enumerate(self.seqs)}

    @property
    def sequences(self) -> list[Request]:
        """Every sequence with tokens of this step on their way."""
        return self.seqs + (self.verify.seqs if self.verify is not None else [])

    def holds(self, seq: Request) -> bool:
        """Whether `seq` has a token of this step on its way."""
        return seq in self.rows or (self.verify is not None and seq in self.verify.rows)

    def wait(self) -> None:
        """Wait until the step's results are on the host."""
        for copy in (self.result, self.verify.result if self.verify is not None else None):
            if copy is not None:
                copy.wait()


def _with_ids(drawn: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`sample_batch`'s result with rows for token ids [N] appended in its layout (their other columns zero), so
    that they travel to the host in the same copy (`unpack` reads them as rows without logprobs)."""
    if drawn.dim() == 1:
        return torch.cat([drawn, ids])
    extra = drawn.new_zeros(ids.shape[0], drawn.shape[1])
    extra[:, 0] = ids
    return torch.cat([drawn, extra])


_ID_ROW = SamplingParams()  # `unpack`'s view of a row `_with_ids` appended: an id, no logprobs


class ModelRunner:
    """`cuda_graphs`: run batched decode steps from captured graphs (padded to buckets; captured on CUDA and
    Ascend devices, elsewhere the padded step runs eagerly, which only tests make use of)."""

    def __init__(self, model: DeepseekV4, use_mtp: bool = False, cuda_graphs: bool = False) -> None:
        if use_mtp and not len(model.mtp):
            raise ValueError("MTP speculative decoding needs the model's MTP module (load it with mtp=True)")
        self.model, self.use_mtp = model, use_mtp
        self.drafts = speculative.DraftStats()
        self.cuda_graphs = cuda_graphs
        self.graphs: DecodeGraphs | None = None
        self.penalty_table = PenaltyTable(model.cfg.vocab_size, model.device)
        # With MTP: the streams of this step's per-sequence feeds, in call order (the MTP module consumes rows of
        # them at the step's end).
        self._streams: list[torch.Tensor] = []
        self._mtp_work: list[MtpWork] = []

    def _states(self, seqs: list[Request]) -> list[SequenceState]:
        states = []
        for s in seqs:
            assert s.state is not None, f"{s.request_id} scheduled without a KV state"
            states.append(s.state)
        return states

    @staticmethod
    def batched_decode(chunk: ScheduledChunk) -> bool:
        """Whether the chunk runs in the step's batched decode (one token over a paged state, no MTP)."""
        s = chunk.seq
        one = chunk.num_tokens == 1 and s.num_uncomputed == 1
        return one and not s.use_mtp and isinstance(s.state, PagedSequenceState)

    @staticmethod
    def verifies(chunk: ScheduledChunk) -> bool:
        """Whether the chunk is an MTP verification (its last token and the draft after it)."""
        s = chunk.seq
        return s.draft is not None and chunk.num_tokens == s.num_uncomputed + 1

    @torch.no_grad()
    def launch(self, chunks: list[ScheduledChunk], after: LaunchedStep | None = None) -> LaunchedStep | None:
        """Run the step of `chunks` and draw its tokens without waiting for them (their copy to the host is queued);
        None when no row draws one (prefill chunks short of their prompts' ends). With `after`, the launched step
        whose tokens some of these sequences still wait for: each such row feeds the token `after` drew for it,
        gathered on the device, and draws the token after it; a verification row also takes its position and draft
        from `after` (`_fed_verify`). With MTP, the positions a step feeds through the per-sequence path (prompt
        chunks) are followed by the MTP over them, their last position paired with the token drawn now, on the
        device; the drafts of rows that caught up stay there. Without overlapped scheduling the engine lands every
        step at once (`land` with no `after`)."""
        decode, groups, verify = self._plan(chunks, after)
        feed = self._fed(decode, after)
        follow: list[MtpWork] = []
        ready, logits = self._forward(decode, groups, follow, feed)
        out: torch.Tensor | None = None
        params: list[SamplingParams] = []
        if logits is not None:
            ahead = [after is not None and after.holds(s) for s in ready]  # all among the decode rows, first
            out, params = self._draw(ready, logits, feed, ahead)
        tokens = sampled_tokens(out) if out is not None else torch.zeros(0, dtype=torch.int64, device=self.model.device)
        for work in follow:
            self._follow(work)
        drafted, drafts = self._run_mtp(ready, tokens)
        launched_verify = self._launch_verify(verify, after) if verify else None
        if out is None:
            return None if launched_verify is None else LaunchedStep([], tokens, None, [], launched_verify)
        result = start_copy_to_host(_with_ids(out, drafts) if drafted else out)
        params += [_ID_ROW] * len(drafted)
        return LaunchedStep(ready, tokens, result, params, launched_verify, drafted, drafts if drafted else None)

    def land(self, launched: LaunchedStep, after: LaunchedStep | None = None) -> list[Request]:
        """Wait for a launched step's tokens and append them to its sequences still running; returns those (a
        sequence finished since the launch is skipped). `after`: the step launched since, which already feeds on the
        device what this step drew for its rows, their drafts included (those stay there)."""
        landed: list[Request] = []
        if launched.result is not None:
            drawn = unpack(launched.result.wait(), launched.params)
            n = len(launched.seqs)
            drafts = {s: drawn[n + i][0] for i, s in enumerate(launched.drafted)}
            for s, (token, logprob) in zip(launched.seqs, drawn[:n], strict=True):
                if s.finished:
                    continue
                s.append(token, logprob)
                landed.append(s)
                # a prefill to export keeps its draft for the blob
                held = after is not None and after.holds(s)
                if s in drafts and (not s.finished or s.export_after_prefill) and not held:
                    self._propose(s, drafts[s])
        v = launched.verify
        if v is None:
            return landed
        drawn = unpack(v.result.wait(), v.params)
        n = len(v.seqs)
        for b, s in enumerate(v.seqs):
            if s.finished:
                continue
            accepted, draft = bool(drawn[2 * n + b][0]), drawn[3 * n + b][0]
            self._settle_verify(s, drawn[2 * b], drawn[2 * b + 1], accepted)
            if not s.finished and not (after is not None and after.holds(s)):
                self._propose(s, draft)
            landed.append(s)
        return landed

    def _run_mtp(self, ready: list[Request], tokens: torch.Tensor) -> tuple[list[Request], torch.Tensor]:
        """Run the step's queued MTP calls, the rows of `ready` (which drew `tokens` [R], device) paired
        with their drawn token at their last position: the rows that caught up and their drafts [D] (device)."""
        if not self._mtp_pending():
            return [], tokens.new_zeros(0)
        drew = {s: i for i, s in enumerate(ready)}
        batches, calls = self._mtp_calls(drew, tokens)
        drafted: list[Request] = []
        drafts = []
        for items, logits in zip(batches, self.forward_mtp(calls), strict=True):  # logits [B, 1, vocab]
            caught = [i for i, s in enumerate(items) if s in drew]
            drafted += [items[i] for i in caught]
            guesses = torch.argmax(logits[:, -1], dim=-1)
            drafts.append(guesses[to_device(torch.tensor(caught, dtype=torch.int64), guesses.device)])
        if not drafts:
            return [], tokens.new_zeros(0)
        return drafted, torch.cat(drafts)

    def _launch_verify(self, seqs: list[Request], after: LaunchedStep | None) -> LaunchedVerify:
        """Launch the verification step of `seqs` (rows `after` holds fed from it on the device): draw, finish and
        queue the copy of its draws, acceptances and next drafts; the sequences advance by one token now."""
        table = self._fed_verify(seqs, after)
        fed, pending = (None, None) if table is None else (table[:, :3], table[:, 3:])
        verify = self.verify_logits(seqs, fed)
        ahead = [after is not None and after.holds(s) for s in seqs]
        advance = None if fed is None else fed[:, 1]
        out, params = self._draw_verify(seqs, verify.logits, verify.drafts, ahead, advance, pending)
        tokens = sampled_tokens(out).view(-1, 2)
        drafts = self.finish_verify(verify, tokens)
        accepted = (tokens[:, 0] == verify.drafts).long()
        next_fed = torch.stack([torch.where(accepted.bool(), tokens[:, 1], tokens[:, 0]), accepted, drafts], dim=1)
        kept = torch.stack([tokens[:, 0], torch.where(accepted.bool(), tokens[:, 1], -1)], dim=1)
        for s in seqs:
            s.draft = None
            s.num_computed += 1
            assert isinstance(s.state, PagedSequenceState)
            s.state.position += 1
            s.state.mtp_position += 1
        result = start_copy_to_host(_with_ids(out, torch.cat([accepted, drafts])))
        return LaunchedVerify(seqs, next_fed, kept, result, params + [_ID_ROW] * (2 * len(seqs)))

    def _fed_verify(self, seqs: list[Request], after: LaunchedStep | None) -> torch.Tensor | None:
        """[V, 5] (device) of what the verification rows feed when `after` holds some: their `LaunchedVerify.fed`
        (token, positions beyond the host's count, draft) and `pending` (the draws on their way), or for a row
        that caught up with its prompt in `after` its drawn token, 0, its MTP draft and (token, -1); the other
        rows their own (last token, 0, draft, -1, -1). None when the host knows every row's."""
        if after is None or not any(after.holds(s) for s in seqs):
            return None
        device = after.tokens.device
        tables, index = [], []
        v = after.verify
        if v is not None:
            tables.append(torch.cat([v.fed, v.pending], dim=1))
        offset = len(v.seqs) if v is not None else 0
        caught = {s: i for i, s in enumerate(after.drafted)}
        if caught:
            assert after.drafts is not None
            drawn = after.tokens[to_device(torch.tensor([after.rows[s] for s in after.drafted]), device)]
            none = torch.full_like(drawn, -1)
            tables.append(torch.stack([drawn, torch.zeros_like(drawn), after.drafts, drawn, none], dim=1))
        known = [[next_token(s), 0, s.draft if s.draft is not None else 0, -1, -1] for s in seqs]
        tables.append(to_device(torch.tensor(known, dtype=torch.int64), device))
        for i, s in enumerate(seqs):
            if v is not None and s in v.rows:
                index.append(v.rows[s])
            elif s in caught:
                index.append(offset + caught[s])
            else:
                index.append(offset + len(caught) + i)
        return torch.cat(tables)[to_device(torch.tensor(index, dtype=torch.int64), device)]

    def _plan(
        self, chunks: list[ScheduledChunk], after: LaunchedStep | None = None
    ) -> tuple[list[Request], dict[int, list[Request]], list[Request]]:
        """The step's batched decode rows (those `after` feeds among them), its per-sequence feeds by length and
        its MTP verifications."""
        decode: list[Request] = []
        groups: dict[int, list[Request]] = defaultdict(list)
        verify: list[Request] = []
        for chunk in chunks:
            s = chunk.seq
            if after is not None and after.holds(s):
                (verify if s.use_mtp else decode).append(s)
                continue
            if self.verifies(chunk):
                verify.append(s)
                continue
            s.draft = None  # the step has no room for it
            if self.batched_decode(chunk):
                decode.append(s)
            else:
                groups[chunk.num_tokens].append(s)
        return decode, groups, verify

    def _forward(
        self,
        decode: list[Request],
        groups: dict[int, list[Request]],
        follow: list[MtpWork],
        feed: torch.Tensor | None = None,
    ) -> tuple[list[Request], torch.Tensor | None]:
        """Run the decode rows (fed `feed` when given) and the per-sequence feeds: the sequences that sample (the
        decode rows first) and their logits, None when none does."""
        ready: list[Request] = []
        logits: list[torch.Tensor] = []
        if decode:
            logits.append(self._decode(decode, feed))
            ready += decode
        for n, seqs in groups.items():
            fed, fed_logits = self._feed(n, seqs, follow)
            ready += fed
            if fed_logits is not None:
                logits.append(fed_logits)
        if not logits:
            return ready, None
        return ready, logits[0] if len(logits) == 1 else torch.cat(logits)

    def _fed(self, decode: list[Request], after: LaunchedStep | None) -> torch.Tensor | None:
        """The ids [D] (device) the decode rows feed when `after` holds the tokens of some: those, gathered from
        `after.tokens`, and the others' last tokens; None when the host knows every row's."""
        if after is None or not any(after.holds(s) for s in decode):
            return None
        where = to_device(torch.tensor([after.rows.get(s, -1) for s in decode], dtype=torch.int64), after.tokens.device)
        if all(after.holds(s) for s in decode):
            return after.tokens[where]
        known = to_device(torch.tensor([s.token_ids[-1] for s in decode], dtype=torch.int64), after.tokens.device)
        return torch.where(where >= 0, after.tokens[where.clamp(min=0)], known)

    def _decode(self, seqs: list[Request], feed: torch.Tensor | None = None) -> torch.Tensor:
        """The batched decode step of `seqs` (one token each, or `feed`'s): logits [len(seqs), vocab] on the
        device."""
        logits = self.decode_logits(seqs, feed)
        for s in seqs:
            s.num_computed += 1
            assert s.state is not None
            s.state.position += 1
        return logits

    def decode_logits(self, seqs: list[Request], feed: torch.Tensor | None = None) -> torch.Tensor:
        """Run the batched decode step of `seqs` (a rank group's leader overrides it to run it on every rank):
        logits [len(seqs), vocab]; the caller advances the sequences. `feed`: the ids [D] the rows feed, on the
        device, when the host does not know them all yet (overlapped scheduling); else each row's last token."""
        state = seqs[0].state
        assert isinstance(state, PagedSequenceState)
        pool = state.pool
        pool.flush_block_tables()
        inputs = DecodeInputs.build(seqs, pool, self.decode_width(seqs, pool))
        return self.run_decode(inputs if feed is None else inputs.feeding(feed), pool)

    def decode_width(self, seqs: list[Request], pool: KVPool, tokens: int = 1) -> int:
        """Block-table columns of the decode step of `seqs` (`tokens` per row): padded to a graph's width when steps
        replay graphs."""
        width = table_width(seqs, pool.block_size, tokens)
        return width_bucket(width, pool.max_blocks) if self.cuda_graphs else width

    def run_decode(self, inputs: DecodeInputs, pool: KVPool, bucket: int | None = None) -> torch.Tensor:
        """The batched decode step of `inputs`: replayed from the graph of its shape (captured on first use, on
        every rank of a group alike; `bucket`: the padded batch, see `DecodeGraphs.run`), or eagerly without
        graphs."""
        if not self.cuda_graphs:
            return self.forward_decode(inputs, pool)
        return self._graphs_of(pool).run(inputs, bucket)

    def _graphs_of(self, pool: KVPool) -> DecodeGraphs:
        if self.graphs is None or self.graphs.pool is not pool:
            self.graphs = DecodeGraphs(self.model, pool, capture=self.model.device.type in GRAPH_DEVICES)
        return self.graphs

    def _feed(self, n: int, seqs: list[Request], follow: list[MtpWork]) -> tuple[list[Request], torch.Tensor | None]:
        """Feed the next n tokens of every sequence through the per-sequence path; returns the sequences that
        caught up and their logits. MTP sequences are queued in `follow` (their streams, first position fed)."""
        ids = torch.tensor([s.token_ids[s.num_computed : s.num_computed + n] for s in seqs], dtype=torch.long)
        rows = [row for row, s in enumerate(seqs) if s.num_uncomputed == n]  # the rows that catch up
        _, logits = self.forward_feed(ids, self._states(seqs), rows)
        call = len(self._streams) - 1  # the call just made (its streams are kept with MTP on)
        for row, s in enumerate(seqs):
            s.num_computed += n
            if s.use_mtp:
                follow.append((s, (call, row), s.num_computed - n, n))
        return [seqs[row] for row in rows], logits

    # The model calls of a step: a rank group's leader overrides them to send each call to its followers first
    # (`parallel/engine_group.py`), so every rank runs the same calls, and hence the same collectives, in order.
    def forward_decode(self, inputs: DecodeInputs, pool: KVPool) -> torch.Tensor:
        """The batched decode step over `pool`: logits [D, vocab]."""
        return self.model.decode_paged(inputs.token_ids, inputs.step(pool))

    def forward_feed(
        self, ids: torch.Tensor, states: list[SequenceState], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed ids [B, n] (on the host: a rank group's leader sends them as they are) through the per-sequence
        path (advancing every state by n): the streams [B, n, hc, d] and the last position's logits of `rows`
        (None when no row needs them)."""
        streams = self.keep_streams(self.model.hidden_streams(to_device(ids, self.model.device), states))
        return streams, self.model.logits(streams[rows, -1]) if rows else None

    def forward_verify(self, inputs: DecodeInputs, pool: KVPool, bucket: int | None = None) -> VerifyStep:
        """The model call of an MTP verification step (`inputs` with drafts), replayed from the graph of its shape
        when steps replay graphs (`bucket`: as in `run_decode`): its logits [B, 2, vocab] and its end
        (`finish_verify`)."""
        if self.cuda_graphs:
            return self._graphs_of(pool).run_verify(inputs, bucket)
        return speculative.start_verification(self.model, inputs, pool)

    def finish_verify(self, verify: VerifyStep, tokens: torch.Tensor) -> torch.Tensor:
        """The end of a verification step whose draws are `tokens` [B, 2] (device): the next drafts [B] (device),
        the rejected drafts' pool writes taken back (`speculative.end_verification`)."""
        return verify.finish(tokens)

    def verify_logits(self, seqs: list[Request], fed: torch.Tensor | None = None) -> VerifyStep:
        """Run the model call of the verification step of `seqs` (a rank group's leader overrides it to run it on
        every rank): `forward_verify`'s result. `fed` (overlapped scheduling): [V, 3] (device) token, positions
        beyond the host's count and draft of each row (`LaunchedVerify.fed`), when the host does not know them."""
        state = seqs[0].state
        assert isinstance(state, PagedSequenceState)
        pool = state.pool
        pool.flush_block_tables()
        width = self.decode_width(seqs, pool, verify_tokens(fed))
        inputs = DecodeInputs.build(seqs, pool, width, True, fed is not None)
        return self.forward_verify(inputs if fed is None else inputs.verifying(fed), pool)

    def forward_mtp(self, calls: list[MtpInput]) -> list[torch.Tensor]:
        """The step's MTP calls (`MtpInput`): the logits [B, 1, vocab] of each call's last position (where the drafts
        come from). The step's streams are dropped after them."""
        out = [self.mtp_rows(*call) for call in calls]
        self.clear_streams()
        return out

    def mtp_rows(
        self,
        refs: list[StreamRef],
        next_ids: torch.Tensor,
        states: list[SequenceState],
        fed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One MTP call over rows `refs` of this step's kept streams (`MtpInput`): the logits [B, 1, vocab] of its
        last position."""
        ids = to_device(next_ids, self.model.device)
        if fed is not None:
            ids = torch.cat([ids[:, :-1], torch.where(fed >= 0, fed, ids[:, -1])[:, None]], dim=1)
        streams = torch.stack([self._streams[c][r] for c, r in refs])
        return self.model.mtp_logits(streams, ids, states, last_only=True)

    def keep_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """Keep the streams of this step's per-sequence feed call (with MTP on, which consumes them at the step's
        end); a rank group's group without rows in a call keeps an empty entry, so the calls number alike."""
        if self.use_mtp:
            self._streams.append(streams)
        return streams

    def clear_streams(self) -> None:
        """Drop the step's kept streams (after its MTP calls)."""
        self._streams = []

    def export_chunks(self, state: SequenceState, chunk_size: int, draft: int | None = None) -> list[bytes]:
        """The KV blob (`kv_export` format) of a sequence's state, in chunks, with its MTP `draft` when it has one (a
        rank group's leader overrides it to fetch a state that another data-parallel group holds)."""
        from dsv4.model_runtime.engine import kv_export  # needs crc32c, which the engine itself does not

        return list(kv_export.export_chunks(self.model, state, chunk_size, draft))

    def _draw(
        self,
        seqs: list[Request],
        logits: torch.Tensor,
        pending: torch.Tensor | None = None,
        ahead: list[bool] | None = None,
    ) -> tuple[torch.Tensor, list[SamplingParams]]:
        """`sample_batch` over the rows of `seqs`, on the device, and the rows' parameters. `ahead`: the rows with
        a token drawn by a launched step that has not landed, `pending` [>= last such row + 1] (device) holding it;
        each of these rows draws the token after its own. Penalized rows read their context from the device table,
        and their drawn tokens go into it here."""
        ahead = ahead or [False] * len(seqs)
        requests = [_request(s, a) for s, a in zip(seqs, ahead, strict=True)]
        rows, penalties = None, None
        if any(s.params.penalized for s in seqs):
            rows = self.penalty_table.rows(seqs, pending, ahead)
            penalties = self.penalty_table.penalties(rows, seqs)
        inputs = SamplingInputs.build(requests, logits.shape[-1], logits.device, penalties)
        out = sample_batch(self.model.ops, logits, inputs)
        if rows is not None:
            self.penalty_table.record(rows, sampled_tokens(out), seqs)
        return out, [r.params for r in requests]

    def _follow(self, work: MtpWork) -> None:
        """Queue the MTP step over the k positions [start, start + k) the main model just consumed (its streams
        [k, hc, d] at the work's stream ref); each pairs with the token after it, which is known: the prompt's next
        token or the one drawn this step. `_run_mtp` runs the queued steps batched by k."""
        s, _, start, _ = work
        assert s.state is not None and s.state.mtp_position == start, "MTP out of step with the main model"
        self._mtp_work.append(work)

    def _mtp_pending(self) -> bool:
        """Whether the step has MTP calls to make or streams to drop (every rank of a group keeps the same)."""
        return self.use_mtp and bool(self._mtp_work or self._streams)

    def _mtp_calls(
        self, drew: dict[Request, int], tokens: torch.Tensor
    ) -> tuple[list[list[Request]], list[MtpInput]]:
        """The queued MTP steps as calls batched by k, with each call's sequences. `drew`, `tokens`: the rows that
        drew a token this step and the tokens [R] (device) on their way to them, which pair with those rows' last
        positions."""
        batches: dict[int, list[MtpWork]] = defaultdict(list)
        for work in self._mtp_work:
            batches[work[3]].append(work)
        self._mtp_work = []
        calls: list[MtpInput] = []
        for k, items in batches.items():
            # a row whose last token is on its way (`fed`) holds a 0 in its place
            ids = [[*s.token_ids[start + 1 : start + k + 1], 0][:k] for s, _, start, _ in items]
            fed = None
            if any(s in drew for s, *_ in items):
                where = torch.tensor([drew.get(s, -1) for s, *_ in items], dtype=torch.int64)
                where = to_device(where, tokens.device)
                fed = torch.where(where >= 0, tokens[where.clamp(min=0)], -1)
            refs = [ref for _, ref, _, _ in items]
            calls.append((refs, torch.tensor(ids, dtype=torch.long), self._states([s for s, *_ in items]), fed))
        return [[s for s, *_ in items] for items in batches.values()], calls

    def _propose(self, s: Request, draft: int) -> None:
        """The MTP's greedy guess for the token after the last one becomes the draft of the next step."""
        s.draft = draft

    def _settle_verify(
        self,
        s: Request,
        first: tuple[int, TokenLogprob | None],
        second: tuple[int, TokenLogprob | None],
        accepted: bool,
    ) -> None:
        """Append a landed verification row's tokens (the second only after an accepted draft, unless the first
        finished the sequence) and count the accepted draft's position (the launch counted the first)."""
        s.append(*first)
        if accepted and not s.finished:
            s.append(*second)
            self.penalty_table.appended(s)
        s.num_computed += accepted
        assert isinstance(s.state, PagedSequenceState)
        s.state.position += accepted
        s.state.mtp_position += accepted
        self.drafts.proposed += 1
        self.drafts.accepted += accepted

    def _draw_verify(
        self,
        seqs: list[Request],
        logits: torch.Tensor,
        drafts: torch.Tensor,
        ahead: list[bool] | None = None,
        advance: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[SamplingParams]]:
        """`sample_batch` over rows [2B] (each sequence's row 0, then its row 1, which draws the token after the
        draft: the next index of its seeded stream, its penalties counting the draft) and the rows' parameters. The
        penalty table counts every row 0's draw and row 1's where the draft stands (`record_accepted`). `ahead`:
        the rows whose previous verification has not landed, whose token indices move on by one and by `advance`
        [B] (device: its accepted drafts); `pending` [B, 2] (device): the draws on their way to those rows' lists
        (`LaunchedVerify.pending`), which a penalized row's refilled table row counts."""
        ahead = ahead or [False] * len(seqs)
        requests = []
        for s, a in zip(seqs, ahead, strict=True):
            first = _request(s, a)
            # Row 1's penalties are the table's with the draft counted (`Penalties.after`), so its token lists are
            # never read: no O(context) copy with the draft appended.
            requests += [first, dataclasses.replace(first, index=first.index + 1)]
        rows, penalties = None, None
        if any(s.params.penalized for s in seqs):
            rows = self.penalty_table.rows(seqs, pending, ahead)
            first_penalties = self.penalty_table.penalties(rows, seqs)
            penalties = Penalties.interleave(first_penalties, first_penalties.after(drafts))
        inputs = SamplingInputs.build(requests, logits.shape[-1], logits.device, penalties)
        if advance is not None:
            inputs = inputs.advanced(torch.repeat_interleave(advance, 2))
        out = sample_batch(self.model.ops, logits.flatten(0, 1), inputs)
        if rows is not None:
            tokens = sampled_tokens(out).view(-1, 2)
            self.penalty_table.record(rows, tokens[:, 0], seqs)
            self.penalty_table.record_accepted(rows, tokens[:, 1], tokens[:, 0] == drafts)
        return out, [r.params for r in requests]
