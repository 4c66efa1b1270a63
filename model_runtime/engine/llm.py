"""`LLM`: the offline entry point (DESIGN §2): text or token-id prompts in, completions or a stream out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from dsv4.model_runtime.engine.llm_engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from dsv4.model_runtime.engine.sampling_params import SamplingParams

Prompt = str | Seq[int]


class LLM:
    """`LLM(path, device="cpu").generate(["hello"], SamplingParams(max_tokens=16, temperature=0.0))`.

    Engine limits (`max_num_seqs`, `max_num_batched_tokens`, `chunked_prefill`, `num_blocks`, `block_size`) are
    keyword arguments, as in `EngineConfig`.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        qat_simulation: bool = True,
        **engine_config: int | bool | float | None,
    ) -> None:
        self.engine = LLMEngine.from_path(
            path,
            device=device,
            dtype=dtype,
            qat_simulation=qat_simulation,
            config=EngineConfig(**engine_config),  # type: ignore[arg-type]
        )
        assert self.engine.tokenizer is not None
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[CompletionOutput]:
        """Complete every prompt (a string, or a list of token ids); outputs in prompt order."""
        batch = self._as_batch(prompts)
        return self.engine.generate_ids([self._encode(p) for p in batch], params or SamplingParams())

    def stream(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, delta) as the batch steps: new token ids and new text of one request."""
        batch = self._as_batch(prompts)
        plist = [params or SamplingParams()] * len(batch) if not isinstance(params, Seq) else list(params)
        index = {}
        for i, (p, sp) in enumerate(zip(batch, plist, strict=True)):
            rid = f"stream-{next(self._ids)}"
            self.engine.add_request(rid, self._encode(p), sp)
            index[rid] = i
        pending = set(index)
        while pending:
            for out in self.engine.step():
                if out.request_id in index:
                    yield index[out.request_id], out
                    if out.finished:
                        pending.discard(out.request_id)

    @staticmethod
    def _as_batch(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # type: ignore[list-item]
        return list(prompts)  # type: ignore[arg-type]
