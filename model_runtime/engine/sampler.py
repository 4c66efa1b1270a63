"""Token sampling: penalties, greedy / temperature / top-k / top-p / min-p, seeded draws, logprobs.

Filtering and the draw itself are the kernel ops `filter_logits` / `sample_tokens` (the model's bound `Ops`);
the penalties, the seeded noise and logprobs stay here.

Each row is sampled on its own, so a request's token never depends on the other rows of the batch. A sampled
token i of a request is drawn by the Gumbel-max trick with noise from an RNG seeded by (seed, i): a resumed or
recomputed decode reproduces the same tokens. Gumbel-max (not an inverse CDF) because its outcome only flips
when the two best perturbed scores are within float noise of each other, whereas a cumulative sum over the
whole vocabulary moves every boundary: recomputing the logits in another batch or chunk shape must not change
the token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from dsv4.kernels.ops import Ops
from dsv4.model_runtime.engine.request import TokenLogprob
from dsv4.model_runtime.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRequest:
    """What the sampler needs of one row: its parameters, context tokens and the index of the token it draws."""

    params: SamplingParams
    seed: int
    index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def token_gumbel(seed: int, index: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Gumbel noise [vocab] (fp64) that decides generated token `index` of a request seeded with `seed`.

    Drawn by the device's own generator, so the same seed gives the same tokens on the same kind of device."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    u = torch.rand(vocab, generator=gen, dtype=torch.float64, device=device).clamp_(min=1e-300)
    return -torch.log(-torch.log(u))


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens; presence and frequency penalties over output tokens."""
    p = req.params
    if not p.penalized:
        return logits
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(req.prompt_token_ids + req.output_token_ids)), dtype=torch.long, device=logits.device
        )
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
        outputs = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(outputs, minlength=logits.shape[-1])
        logits -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _row_params(
    p: SamplingParams, device: torch.device, greedy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's (temperature, top_k, top_p, min_p) as the registry's sampling ops take them; 0 = greedy."""
    return (
        torch.tensor([0.0 if greedy else p.temperature], dtype=torch.float64, device=device),
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


def sample_row(ops: Ops, logits: torch.Tensor, req: SampleRequest) -> tuple[int, TokenLogprob | None]:
    """One row: logits [vocab] fp32 -> (token id, its logprob record when asked)."""
    p = req.params
    scores = apply_penalties(logits, req)
    vocab, device = scores.shape[-1], scores.device
    if p.greedy:
        noise = torch.zeros(vocab, dtype=torch.float64, device=device)
    else:
        noise = token_gumbel(req.seed, req.index, vocab, device)
    token = int(ops.sample_tokens(scores[None], *_row_params(p, device, p.greedy), noise[None])[0])
    if p.logprobs is None:
        return token, None
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, p.logprobs) if p.logprobs else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    return token, TokenLogprob(logprob=float(logp[token]), top=pairs)


def sample(ops: Ops, logits: torch.Tensor, requests: list[SampleRequest]) -> list[tuple[int, TokenLogprob | None]]:
    """logits [B, vocab] -> one (token, logprob) per row."""
    return [sample_row(ops, logits[row], req) for row, req in enumerate(requests)]
