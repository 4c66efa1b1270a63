"""Token sampling: logit biases, penalties, greedy / temperature / top-k / top-p / min-p, seeded draws, logprobs.

Every row a step samples goes through one batched call (`sample_batch`): a fixed sequence of tensor ops whatever
the batch, with no value read on the host. What the rows need (any top-k? any logprobs?) is known on the host
from their parameters (`SamplingFlags`), so no stage inspects tensors to decide whether to run. Filtering and the
draw are the kernel ops `filter_logits` / `sample_tokens_seeded` (the model's bound `Ops`); the penalties and the
logprobs stay here. The result comes back to the host in one copy (`engine.transfer.to_host`).

Each row is sampled on its own, so a request's token never depends on the other rows of the batch. A sampled
token i of a request is drawn by the Gumbel-max trick with noise from a counter-based hash of (seed, i, token id)
(`gumbel_noise` in kernels/reference/sampling.py; the cuda backend computes the same hash inside its sampling
kernel, for the tokens a row can draw only): integer ops that every device computes alike, so a resumed or
recomputed decode reproduces the same tokens, on any device. Gumbel-max (not an inverse CDF) because its outcome
only flips when the two best perturbed scores are within float noise of each other, whereas a cumulative sum over
the whole vocabulary moves every boundary: recomputing the logits in another batch or chunk shape must not change
the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from dsv4.kernels.ops import Ops
from dsv4.model_runtime.engine.request import TokenLogprob
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.transfer import to_device, to_host


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler needs of one row: its parameters, context tokens and the index of the token it draws."""

    params: SamplingParams
    seed: int
    index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(frozen=True)
class SamplingFlags:
    """What the rows of a batch use, read from their parameters on the host: the work the batch needs."""

    greedy: bool  # every row is greedy: no noise, no filter
    top_k: bool
    top_p: bool
    min_p: bool
    penalties: bool
    bias: bool  # a row has a logit_bias
    logprobs: int  # the most alternatives a row asks for; -1 when no row asks for logprobs

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SamplingFlags:
        sampled = [p for p in params if not p.greedy]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            greedy=not sampled,
            top_k=any(p.top_k > 0 for p in sampled),
            top_p=any(p.top_p < 1.0 for p in sampled),
            min_p=any(p.min_p > 0.0 for p in sampled),
            penalties=any(p.penalized for p in params),
            bias=any(p.logit_bias for p in params),
            logprobs=max(asked, default=-1),
        )


def sampling_columns(req: SampleRequest) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A row's integer columns (seed, token index, top_k) and float columns (temperature, 0 = greedy; top_p;
    min_p) of `SamplingInputs`."""
    p = req.params
    return (req.seed, req.index, p.top_k), (0.0 if p.greedy else p.temperature, p.top_p, p.min_p)


class PenaltyContext(Protocol):
    """What the penalties of a row read: its parameters and its prompt and output tokens (a `SampleRequest`, or
    the engine's request itself)."""

    @property
    def params(self) -> SamplingParams: ...

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class Penalties:
    """The context of penalized rows, per row: seen [R, V] bool (the token is in the prompt or the output), counts
    [R, V] int32 (its occurrences in the output) and (repetition, presence, frequency) [R, 3] float64 (1, 0, 0 in
    rows without penalties, whose seen and counts are all zero)."""

    seen: torch.Tensor
    counts: torch.Tensor
    values: torch.Tensor

    @classmethod
    def build(cls, requests: Sequence[PenaltyContext], vocab: int, device: torch.device) -> Penalties:
        """From the rows' token lists: their ids go to the device, O(context) per penalized row (the engine's
        batched step keeps them on the device instead: `penalty_table.py`)."""
        rows = [
            [*r.prompt_token_ids, *(t + vocab for t in r.output_token_ids)] if r.params.penalized else []
            for r in requests
        ]
        width = max(1, max(len(r) for r in rows))
        ids = to_device(torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int64), device)
        dump = 2 * vocab  # the column padding scatters into
        counts = torch.zeros(len(rows), 2 * vocab + 1, dtype=torch.int32, device=device)
        counts.scatter_add_(1, torch.where(ids >= 0, ids, dump), torch.ones_like(ids, dtype=torch.int32))
        in_prompt, outputs = counts[:, :vocab], counts[:, vocab:dump]
        return cls((in_prompt + outputs) > 0, outputs.contiguous(), cls.values_of(requests, device))

    def after(self, tokens: torch.Tensor) -> Penalties:
        """The same rows one token later: `tokens` [R] (device) appended to their outputs (the second draw of an
        MTP verification step, which follows the draft)."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        seen = self.seen.index_put((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        counts = self.counts.index_put((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        return Penalties(seen, counts, self.values)

    @staticmethod
    def interleave(first: Penalties, second: Penalties) -> Penalties:
        """Rows [2R]: row r of `first`, then row r of `second`, for each r."""

        def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.stack([a, b], dim=1).flatten(0, 1)

        return Penalties(
            pairs(first.seen, second.seen), pairs(first.counts, second.counts), pairs(first.values, second.values)
        )

    @staticmethod
    def values_of(requests: Sequence[PenaltyContext], device: torch.device) -> torch.Tensor:
        """(repetition, presence, frequency) [R, 3] float64 of the rows, on the device."""
        values = torch.tensor(
            [(r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty) for r in requests],
            dtype=torch.float64,
        )
        return to_device(values, device)


@dataclass(frozen=True)
class LogitBias:
    """The logit_bias entries of a batch, flat on the device: row [N] int64, token id [N] int64, bias [N] float64."""

    rows: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> LogitBias:
        entries = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias]
        rows, ids, values = zip(*entries, strict=True)
        return cls(
            to_device(torch.tensor(rows, dtype=torch.int64), device),
            to_device(torch.tensor(ids, dtype=torch.int64), device),
            to_device(torch.tensor(values, dtype=torch.float64), device),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] with the biases added (a new tensor)."""
        return logits.index_put((self.rows, self.ids), self.values.to(logits.dtype), accumulate=True)


@dataclass(frozen=True)
class SamplingInputs:
    """The sampling state of a batch on the device: ints [R, 3] int64 (seed, token index, top_k), floats [R, 3]
    float64 (temperature, 0 = greedy; top_p; min_p), the host-side flags, the penalties' context and the logit
    biases."""

    ints: torch.Tensor
    floats: torch.Tensor
    flags: SamplingFlags
    penalties: Penalties | None
    bias: LogitBias | None = None

    @classmethod
    def build(
        cls, requests: Sequence[SampleRequest], vocab: int, device: torch.device, penalties: Penalties | None = None
    ) -> SamplingInputs:
        """The inputs of sampling `requests`; the penalties (when a row has any) are `penalties` if given, else
        built from the rows' token lists."""
        columns = [sampling_columns(r) for r in requests]
        ints = torch.tensor([c[0] for c in columns], dtype=torch.int64).view(-1, 3)
        floats = torch.tensor([c[1] for c in columns], dtype=torch.float64).view(-1, 3)
        flags = SamplingFlags.of([r.params for r in requests])
        if flags.penalties and penalties is None:
            penalties = Penalties.build(requests, vocab, device)
        bias = LogitBias.build([r.params for r in requests], device) if flags.bias else None
        return cls(
            to_device(ints, device), to_device(floats, device), flags, penalties if flags.penalties else None, bias
        )

    def advanced(self, by: torch.Tensor) -> SamplingInputs:
        """The same inputs with each row's token index moved on by `by` [R] (device): the rows of an overlapped
        verification step, whose previous step's accepted drafts the host has not counted yet."""
        ints = self.ints.clone()
        ints[:, 1] += by
        return replace(self, ints=ints)


def penalize(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens; presence and frequency penalties over output tokens.
    logits [R, V] are not modified; rows without penalties come back unchanged."""
    outputs = penalties.counts.to(logits.dtype)
    rep, presence, frequency = (v.to(logits.dtype)[:, None] for v in penalties.values.unbind(-1))
    x = torch.where(penalties.seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return x - (frequency * outputs + presence * (penalties.counts > 0).to(logits.dtype))


def sample_batch(ops: Ops, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """logits [R, V] -> what the host needs, on the device: token ids [R] int64, or with logprobs asked, [R, 2 + 2k]
    float64 rows (token id, its logprob, then the k best ids and their logprobs); see `unpack`."""
    flags = inputs.flags
    scores = inputs.bias.apply(logits) if inputs.bias is not None else logits
    scores = penalize(scores, inputs.penalties) if inputs.penalties is not None else scores
    if flags.greedy:
        tokens = torch.argmax(scores, dim=-1)
    else:
        seed, index, top_k = inputs.ints.unbind(-1)
        temperature, top_p, min_p = inputs.floats.unbind(-1)
        tokens = ops.sample_tokens_seeded(
            scores,
            temperature,
            top_k if flags.top_k else None,
            top_p if flags.top_p else None,
            min_p if flags.min_p else None,
            seed,
            index,
        )
    if flags.logprobs < 0:
        return tokens
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, flags.logprobs, dim=-1)
    picked = logp.gather(-1, tokens[:, None])
    return torch.cat([tokens[:, None].double(), picked.double(), top.indices.double(), top.values.double()], dim=-1)


def sampled_tokens(drawn: torch.Tensor) -> torch.Tensor:
    """The token ids [R] int64 of `sample_batch`'s result, on its device."""
    return drawn if drawn.dim() == 1 else drawn[:, 0].long()


def unpack(host: torch.Tensor, params: Sequence[SamplingParams]) -> list[tuple[int, TokenLogprob | None]]:
    """The host copy of `sample_batch`'s result -> (token, logprob record when the row asked for one) per row."""
    if host.dim() == 1:
        return [(t, None) for t in host.tolist()]
    rows = host.tolist()
    k = (host.shape[1] - 2) // 2
    out: list[tuple[int, TokenLogprob | None]] = []
    for row, p in zip(rows, params, strict=True):
        token = int(row[0])
        if p.logprobs is None:
            out.append((token, None))
            continue
        ids, values = row[2 : 2 + p.logprobs], row[2 + k : 2 + k + p.logprobs]
        top = tuple((int(i), v) for i, v in zip(ids, values, strict=True))
        out.append((token, TokenLogprob(logprob=row[1], top=top)))
    return out


def sample(ops: Ops, logits: torch.Tensor, requests: Sequence[SampleRequest]) -> list[tuple[int, TokenLogprob | None]]:
    """logits [R, vocab] -> one (token, logprob) per row: one batched draw, one copy to the host."""
    inputs = SamplingInputs.build(requests, logits.shape[-1], logits.device)
    return unpack(to_host(sample_batch(ops, logits, inputs)), [r.params for r in requests])


def sample_row(ops: Ops, logits: torch.Tensor, req: SampleRequest) -> tuple[int, TokenLogprob | None]:
    """One row: logits [vocab] -> (token id, its logprob record when asked)."""
    return sample(ops, logits[None], [req])[0]


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """One row's logits [V] after its penalties (a new tensor)."""
    if not req.params.penalized:
        return logits
    return penalize(logits[None], Penalties.build([req], logits.shape[-1], logits.device))[0]


def _row_params(
    p: SamplingParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's (temperature, top_k, top_p, min_p) as the registry's sampling ops take them."""
    return (
        torch.tensor([p.temperature], dtype=torch.float64, device=device),
        torch.tensor([p.top_k], dtype=torch.long, device=device),
        torch.tensor([p.top_p], dtype=torch.float64, device=device),
        torch.tensor([p.min_p], dtype=torch.float64, device=device),
    )


def filtered_logits(ops: Ops, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """fp64 logits / temperature with the tokens top-k, top-p and min-p exclude set to -inf."""
    return ops.filter_logits(logits[None], *_row_params(p, logits.device))[0]


def filtered_probs(ops: Ops, logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: softmax of `filtered_logits` (fp64)."""
    return torch.softmax(filtered_logits(ops, logits, p), dim=-1)
