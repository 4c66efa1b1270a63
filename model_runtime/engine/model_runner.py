"""Runs one scheduled step through the model and samples the sequences whose tokens are all computed.

The model advances every row of a call by the same number of tokens, so the step's chunks are grouped by length:
all decoding sequences (one token each) share one call, prefill chunks of equal length share another.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dsv4.model_runtime.engine.sampler import SampleRequest, sample
from dsv4.model_runtime.engine.scheduler import ScheduledChunk
from dsv4.model_runtime.engine.sequence import Sequence, TokenLogprob
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4


class ModelRunner:
    def __init__(self, model: DeepseekV4) -> None:
        self.model = model

    def run(self, chunks: list[ScheduledChunk]) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Feed every chunk; returns (sequence, sampled token, logprob) for each sequence that is now caught up."""
        groups: dict[int, list[Sequence]] = defaultdict(list)
        for chunk in chunks:
            groups[chunk.num_tokens].append(chunk.seq)
        sampled: list[tuple[Sequence, int, TokenLogprob | None]] = []
        for n, seqs in groups.items():
            ids = torch.tensor(
                [s.token_ids[s.num_computed : s.num_computed + n] for s in seqs],
                dtype=torch.long,
                device=self.model.device,
            )
            states = []
            for s in seqs:
                assert s.state is not None, f"{s.request_id} scheduled without a KV state"
                states.append(s.state)
            logits = self.model.prefill(ids, states, last_only=True)  # [B, vocab] fp32
            ready: list[int] = []
            for row, s in enumerate(seqs):
                s.num_computed += n
                if s.num_uncomputed == 0:
                    ready.append(row)
            if not ready:
                continue
            requests = [
                SampleRequest(
                    params=seqs[row].params,
                    seed=seqs[row].seed,
                    index=seqs[row].num_generated,
                    prompt_token_ids=seqs[row].prompt_token_ids,
                    output_token_ids=seqs[row].output_token_ids,
                )
                for row in ready
            ]
            results = sample(logits[ready].cpu(), requests)
            sampled.extend((seqs[row], token, lp) for row, (token, lp) in zip(ready, results, strict=True))
        return sampled
