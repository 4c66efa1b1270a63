"""Runs one scheduled step through the model and samples the sequences whose tokens are all computed.

The model advances every row of a call by the same number of tokens, so the step's chunks are grouped by length:
all decoding sequences (one token each) share one call, prefill chunks of equal length share another, and MTP
verification steps (last token + draft) share a third. Sampled tokens are appended to their sequence here, in
order, because a second token of a verified draft is drawn only if the first did not finish the request.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dsv4.kernels.ops import Ops
from dsv4.model_runtime.engine import speculative
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampler import SampleRequest, sample_row
from dsv4.model_runtime.engine.scheduler import ScheduledChunk
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.state import SequenceState


def _request(seq: Request) -> SampleRequest:
    return SampleRequest(seq.params, seq.seed, seq.num_generated, seq.prompt_token_ids, seq.output_token_ids)


def _draw(ops: Ops, seq: Request, logits: torch.Tensor) -> int:
    """Sample the sequence's next token from logits [vocab] and append it; returns the token."""
    token, logprob = sample_row(ops, logits, _request(seq))
    seq.append(token, logprob)
    return token


class ModelRunner:
    def __init__(self, model: DeepseekV4, use_mtp: bool = False) -> None:
        if use_mtp and not len(model.mtp):
            raise ValueError("MTP speculative decoding needs the model's MTP module (load it with mtp=True)")
        self.model = model
        self.drafts = speculative.DraftStats()
        self._mtp_work: list[tuple[Request, torch.Tensor, int]] = []

    def _states(self, seqs: list[Request]) -> list[SequenceState]:
        states = []
        for s in seqs:
            assert s.state is not None, f"{s.request_id} scheduled without a KV state"
            states.append(s.state)
        return states

    @torch.no_grad()
    def run(self, chunks: list[ScheduledChunk]) -> list[Request]:
        """Feed every chunk; returns the sequences that received new tokens this step."""
        groups: dict[int, list[Request]] = defaultdict(list)
        verify: list[Request] = []
        for chunk in chunks:
            s = chunk.seq
            if s.draft is not None and chunk.num_tokens == s.num_uncomputed + 1:
                verify.append(s)
            else:
                s.draft = None  # the step has no room for it
                groups[chunk.num_tokens].append(s)
        produced = [s for n, seqs in groups.items() for s in self._feed(n, seqs)]
        if verify:
            produced += self._verify(verify)
        self._run_mtp()
        return produced

    def _feed(self, n: int, seqs: list[Request]) -> list[Request]:
        """Feed the next n tokens of every sequence; sample those that caught up."""
        ids = torch.tensor(
            [s.token_ids[s.num_computed : s.num_computed + n] for s in seqs], dtype=torch.long, device=self.model.device
        )
        streams = self.model.hidden_streams(ids, self._states(seqs))  # [B, n, hc, d]
        ready = []
        for row, s in enumerate(seqs):
            s.num_computed += n
            if s.num_uncomputed == 0:
                ready.append(row)
        logits = self.model.logits(streams[ready, -1]) if ready else None
        produced = []
        for row, s in enumerate(seqs):
            if logits is not None and row in ready:
                _draw(self.model.ops, s, logits[ready.index(row)])
                produced.append(s)
            if s.use_mtp and not s.finished:
                self._follow(s, streams[row], s.num_computed - n)
        return produced

    def _follow(self, s: Request, streams: torch.Tensor, start: int) -> None:
        """Queue the MTP step over the positions [start, start + k) the main model just consumed (streams
        [k, hc, d]); each pairs with the token after it, which is known: the prompt's next token or the one just
        sampled. `_run_mtp` runs the queued steps batched by k."""
        assert s.state is not None and s.state.mtp_position == start, "MTP out of step with the main model"
        self._mtp_work.append((s, streams, start))

    def _run_mtp(self) -> None:
        groups: dict[int, list[tuple[Request, torch.Tensor, int]]] = defaultdict(list)
        for item in self._mtp_work:
            groups[item[1].shape[0]].append(item)
        self._mtp_work = []
        for k, items in groups.items():
            seqs = [s for s, _, _ in items]
            ids = [s.token_ids[start + 1 : start + k + 1] for s, _, start in items]
            streams = torch.stack([st for _, st, _ in items])
            next_ids = torch.tensor(ids, dtype=torch.long, device=self.model.device)
            logits = self.model.mtp_logits(streams, next_ids, self._states(seqs))  # [B, k, vocab]
            drafts = torch.argmax(logits[:, -1], dim=-1).tolist()
            for s, draft in zip(seqs, drafts, strict=True):
                if s.num_computed == s.num_tokens - 1 and not s.finished:
                    self._propose(s, draft)

    def _propose(self, s: Request, draft: int) -> None:
        """The MTP's greedy guess for the token after the last one becomes the draft of the next step."""
        s.draft = draft

    def _verify(self, seqs: list[Request]) -> list[Request]:
        """Feed [last token, draft] per sequence; keep the draft iff it is the token plain decoding would draw."""
        window = self.model.cfg.sliding_window
        states = self._states(seqs)
        saved = [speculative.snapshot(st, 2, window) for st in states]
        ids = torch.tensor([[s.token_ids[-1], s.draft] for s in seqs], dtype=torch.long, device=self.model.device)
        streams = self.model.hidden_streams(ids, states)  # [B, 2, hc, d]
        logits = self.model.logits(streams)  # [B, 2, vocab]
        rejected: list[int] = []
        for row, s in enumerate(seqs):
            draft, s.draft = s.draft, None
            self.drafts.proposed += 1
            start = s.num_computed
            if _draw(self.model.ops, s, logits[row, 0]) == draft:
                self.drafts.accepted += 1
                s.num_computed += 2
                if not s.finished:
                    _draw(self.model.ops, s, logits[row, 1])
                if s.use_mtp and not s.finished:
                    self._follow(s, streams[row], start)
            else:
                speculative.rollback(states[row], saved[row])
                rejected.append(row)
        if rejected:
            again = [seqs[row] for row in rejected]
            last = torch.tensor([[s.token_ids[s.num_computed]] for s in again], dtype=torch.long, device=ids.device)
            refed = self.model.hidden_streams(last, [states[row] for row in rejected])
            for k, s in enumerate(again):
                s.num_computed += 1
                if s.use_mtp and not s.finished:
                    self._follow(s, refed[k], s.num_computed - 1)
        return seqs
