"""The synchronous engine core: requests in, one `step()` at a time, per-request token and text deltas out."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dsv4.model_runtime.engine import speculative
from dsv4.model_runtime.engine.cuda_graphs import GRAPH_DEVICES
from dsv4.model_runtime.engine.fingerprint import model_fingerprint
from dsv4.model_runtime.engine.kv_budget import kv_budget
from dsv4.model_runtime.engine.kv_groups import GroupKV
from dsv4.model_runtime.engine.kv_state import KVCacheManager
from dsv4.model_runtime.engine.model_runner import LaunchedStep, ModelRunner
from dsv4.model_runtime.engine.port import PrefixEvent
from dsv4.model_runtime.engine.prefix_cache import PrefixStats
from dsv4.model_runtime.engine.prefix_hash import chain_seed
from dsv4.model_runtime.engine.request import Request, TokenLogprob
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.scheduler import Scheduler, SchedulerConfig
from dsv4.model_runtime.engine.text_stream import TextStream
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.tokenizer import Tokenizer

if TYPE_CHECKING:  # the KV blob format needs crc32c, which the bare GPU machine of bench/gpu.sh lacks
    from dsv4.model_runtime.engine.kv_export import KVSnapshot

log = logging.getLogger("dsv4.model_runtime.engine")

OVERLAP_DEVICES = ("cuda",)  # devices whose queued work runs behind the host (and whose copies to it are async)


@dataclass(frozen=True)
class EngineConfig:
    """Batch limits and the KV pool size (in blocks of `block_size` positions): `num_blocks`, or None for
    `kv_memory_fraction` of the device memory free after loading (`kv_budget`)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    num_blocks: int | None = None
    kv_memory_fraction: float = 0.9
    block_size: int = 256
    num_slots: int = 0  # sequences holding a state at once (running + awaiting export); 0 = max_num_seqs + 8
    speculative_mtp: bool = False  # draft one token per decode step with the checkpoint's MTP module
    # on a CUDA device (or an Ascend NPU, untested), replay batched decode steps from captured graphs
    cuda_graphs: bool = True
    # Prefix caching (docs/engine.md): requests sharing a prompt prefix share its KV blocks and resume from a
    # snapshot of the rest of its state; `prefix_cache_slots` snapshots are kept (each the size of a sequence slot).
    prefix_cache: bool = True
    prefix_cache_slots: int = 64
    # Overlapped scheduling: a step is launched before the previous step's tokens reach the host, so the host's
    # scheduling and bookkeeping run while the device computes. None: on where the device runs behind the host
    # (CUDA); True / False: forced (on a CPU it only delays each step's outputs by one step).
    overlap_scheduling: bool | None = None


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced in one step: new tokens (from `first_index` on), new text, and the finish."""

    request_id: str
    first_index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None


@dataclass
class CompletionOutput:
    """A finished request (`LLM.generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LLMEngine:
    """Continuous batching over the model: `add_request`, then `step()` until `has_unfinished()` is False."""

    def __init__(
        self, model: DeepseekV4, tokenizer: Tokenizer | None, config: EngineConfig | None = None, kv_groups: int = 1
    ) -> None:
        """`kv_groups`: the data-parallel groups whose KV pools this engine schedules (a rank group's leader under
        data-parallel attention, `kv_groups.py`); 1 otherwise."""
        self.config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        c = self.config
        slots = c.num_slots or c.max_num_seqs + 8
        prefix_slots = c.prefix_cache_slots if c.prefix_cache else 0
        self.kv_budget = kv_budget(
            model.cfg,
            model.device,
            model.dtype,
            model.qat_simulation,
            len(model.mtp),
            c.block_size,
            slots + prefix_slots,
            c.num_blocks,
            c.kv_memory_fraction,
        )
        log.info("%s", self.kv_budget.describe())
        self.fingerprint = model_fingerprint(model)
        self.kv_groups = kv_groups
        prefix_seed = chain_seed(self.fingerprint, c.block_size) if c.prefix_cache else None
        self.kv: KVCacheManager | GroupKV
        if kv_groups > 1:
            self.kv = GroupKV(
                model, self.kv_budget.num_blocks, c.block_size, slots, kv_groups, prefix_slots, prefix_seed
            )
            log.info(
                "data-parallel attention: %d groups' KV pools of %d blocks each, %d token positions in all",
                kv_groups,
                self.kv_budget.num_blocks,
                kv_groups * self.kv_budget.max_tokens,
            )
        else:
            self.kv = KVCacheManager(
                model,
                self.kv_budget.num_blocks,
                c.block_size,
                slots,
                prefix_slots=prefix_slots,
                prefix_seed=prefix_seed,
            )
        self.scheduler = Scheduler(
            SchedulerConfig(c.max_num_seqs, c.max_num_batched_tokens, c.chunked_prefill), self.kv
        )
        self.runner = ModelRunner(
            model, use_mtp=c.speculative_mtp, cuda_graphs=c.cuda_graphs and model.device.type in GRAPH_DEVICES
        )
        self.eos_token_id = model.cfg.eos_token_id
        overlap = c.overlap_scheduling
        self.overlap = model.device.type in OVERLAP_DEVICES if overlap is None else overlap
        self._launched: LaunchedStep | None = None  # the overlapped step whose tokens have not landed
        self._sent: dict[str, int] = {}
        # Finished `export_after_prefill` sequences whose state waits for its export (then `release`).
        self.exported: dict[str, Request] = {}

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        qat_simulation: bool = True,
        config: EngineConfig | None = None,
    ) -> LLMEngine:
        """Load the checkpoint folder's model and tokenizer."""
        from dsv4.model_runtime.weights import load_model

        model = load_model(path, device=device, dtype=dtype, qat_simulation=qat_simulation)
        return cls(model, Tokenizer.from_pretrained(path), config)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        output_token_ids: Sequence[int] = (),
        snapshot: KVSnapshot | None = None,
        export_after_prefill: bool = False,
    ) -> Request:
        """Queue a request. `output_token_ids` are already generated tokens to replay (a resumed decode);
        `snapshot` is an imported KV state (`kv_export.load`) covering exactly the prompt. Raises ValueError for a
        request that cannot run."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: empty prompt")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in [*prompt_token_ids, *output_token_ids] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id}: token ids {bad[:5]} outside the vocabulary (size {vocab})")
        biased = [t for t, _ in params.logit_bias if t >= vocab]
        if biased:
            raise ValueError(f"request {request_id}: logit_bias ids {biased[:5]} outside the vocabulary ({vocab})")
        if snapshot is not None and snapshot.position != len(prompt_token_ids):
            raise ValueError(
                f"request {request_id}: KV state covers {snapshot.position} positions, "
                f"the prompt has {len(prompt_token_ids)}"
            )
        longest = len(prompt_token_ids) + params.max_tokens
        if longest > self.model.cfg.max_position_embeddings:
            raise ValueError(
                f"request {request_id}: prompt + max_tokens = {longest} exceeds the model's "
                f"{self.model.cfg.max_position_embeddings} positions"
            )
        if len(output_token_ids) >= params.max_tokens:
            raise ValueError(f"request {request_id}: {len(output_token_ids)} tokens already generated >= max_tokens")
        if self.scheduler.get(request_id) is not None:
            raise ValueError(f"request {request_id} is already in the engine")
        text = (
            TextStream(self.tokenizer, params.stop, params.skip_special_tokens) if self.tokenizer is not None else None
        )
        seq = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            eos_token_id=self.eos_token_id,
            text=text,
            output_token_ids=list(output_token_ids),
            export_after_prefill=export_after_prefill,
        )
        if text is not None:
            for t in seq.output_token_ids:
                text.add(t)
            text.delta(final=False)  # replayed text was delivered by whoever generated it
        if snapshot is not None:
            seq.snapshot, seq.num_computed = snapshot, len(seq.prompt_token_ids)
        # An imported state without an MTP cache (exported by an engine without MTP) decodes without drafts; one with
        # it verifies the draft it carries in its first decode step.
        seq.use_mtp = self.config.speculative_mtp and (snapshot is None or snapshot.mtp_layers > 0)
        if seq.use_mtp and snapshot is not None:
            seq.draft = snapshot.mtp_draft
        self.scheduler.add(seq)
        self._sent[request_id] = seq.num_generated
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; returns its final (empty) output, or None if the engine does not know it."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        seq.finish("cancelled")
        self._settle()
        return self._output(seq)

    def release(self, seq: Request) -> None:
        """Free the state a finished `export_after_prefill` sequence kept for its export."""
        self.exported.pop(seq.request_id, None)
        self.kv.free(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats_extra(self) -> dict[str, float]:
        """Counters beyond the batch figures: the KV pool's size (blocks, tokens, bytes; every data-parallel group's
        pool), KV bytes per token, preemptions, MTP drafts and acceptance, prefill tokens computed and the prefix
        cache's lookups, hits, size and evictions."""
        drafts = self.runner.drafts
        out = {
            "kv_pool_blocks": float(self.kv_groups * self.kv_budget.num_blocks),
            "kv_pool_max_tokens": float(self.kv_groups * self.kv_budget.max_tokens),
            "kv_pool_bytes": float(self.kv_groups * self.kv_budget.pool_bytes),
            "kv_bytes_per_token": float(self.kv.bytes_per_token),
            "preemptions": float(self.scheduler.num_preemptions),
            "mtp_drafts_proposed": float(drafts.proposed),
            "mtp_drafts_accepted": float(drafts.accepted),
            "mtp_acceptance_rate": drafts.acceptance_rate,
            "prefill_tokens": float(self.scheduler.prefill_tokens),
        }
        cache = self.kv.cache
        if cache is not None:
            st = cache.stats
            out |= {
                "prefix_cache_queries": float(st.queries),
                "prefix_cache_hits": float(st.hits),
                "prefix_cache_query_tokens": float(st.query_tokens),
                "prefix_cache_hit_tokens": float(st.hit_tokens),
                "prefix_cache_entries": float(len(cache)),
                "prefix_cache_blocks": float(self.kv.cached_blocks),
                "prefix_cache_bytes": float(self.kv.cache_bytes),
                "prefix_cache_evictions": float(st.evictions),
                "prefix_cache_imported": float(st.imported),
            }
        return out

    def warm_up(self, prompt_tokens: int = 16) -> float:
        """Run one short greedy request through a prefill and a batch-1 decode step, then forget it; returns the
        seconds it took.

        Whatever a first step does lazily (Triton compiles, the decode step's CUDA graph, the allocator's growth,
        torch_npu's operator cache) happens here, before a worker reports ready, instead of on a client's request.
        Forgetting it: the prefix cache entries it stored are evicted and their events dropped (no router may send
        work here for a prompt nobody sent), and the counters it moved are reset (the prefill-token and prefix
        counters count clients' work only)."""
        if self.has_unfinished():
            raise RuntimeError("warm_up runs before the engine takes requests")
        started = time.perf_counter()
        vocab = self.model.cfg.vocab_size
        prompt = [(7 * i + 1) % vocab for i in range(prompt_tokens)]
        self.generate_ids([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        self.scheduler.prefill_tokens = 0
        self.runner.drafts = speculative.DraftStats()
        cache = self.kv.cache
        if cache is not None:
            while self.kv.evict():
                pass
            cache.drain_events()
            cache.stats = PrefixStats()
        return time.perf_counter() - started

    # ---- prefix cache (the serving workers' shared tier and KV events) --------------------------------------------
    @property
    def prefix_block_size(self) -> int | None:
        """Tokens per hashed block of the prefix cache's keys; None when the cache is off."""
        return self.kv.block_size if self.kv.cache is not None else None

    def cached_prefix_len(self, token_ids: Sequence[int]) -> int:
        """Positions of `token_ids` a request with this prompt would not compute (0 without the cache)."""
        cache = self.kv.cache
        if cache is None or not token_ids:
            return 0
        entry = cache.lookup(cache.prompt(list(token_ids)), len(token_ids) - 1)
        return entry.position if entry is not None else 0

    def import_prefix(self, token_ids: Sequence[int], snapshot: KVSnapshot) -> bool:
        """Make a cache entry of an imported state (`kv_export.load` verified it) of exactly `token_ids`. False when
        it is cached already, the cache is off or the pool has no room; ValueError when the state does not cover
        `token_ids`."""
        cache = self.kv.cache
        if cache is None:
            return False
        if snapshot.position != len(token_ids):
            raise ValueError(f"imported prefix state covers {snapshot.position} positions, not {len(token_ids)}")
        return self.kv.import_entry(cache.prompt(list(token_ids)), snapshot) is not None

    def export_prefix(self, chain_hash: str, chunk_size: int) -> list[bytes] | None:
        """The KV blob (`kv_export` format) of the aligned entry with this chain hash; None when it is not held."""
        cache = self.kv.cache
        entry = cache.by_chain_hash(chain_hash) if cache is not None else None
        if entry is None:
            return None
        return self.runner.export_chunks(self.kv.entry_state(entry), chunk_size)

    def prefix_events(self) -> list[PrefixEvent]:
        """Aligned prefixes stored and evicted since the last call."""
        return self.kv.cache.drain_events() if self.kv.cache is not None else []

    def held_prefixes(self) -> list[str]:
        """Chain hashes of the aligned prefixes the cache holds now."""
        return self.kv.cache.chain_hashes() if self.kv.cache is not None else []

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns the outputs of the requests that produced something.

        With overlapped scheduling a step is launched without waiting for its tokens, which land in the next call
        after that call has launched the step after it: that step's rows holding a token on its way feed it from
        the device (an MTP verification row its position and draft too), and its other chunks (prefills, arrivals,
        prefills to export, the MTP over them) run beside them. Penalized rows read their context from the device's
        penalty table, which counts the tokens on their way; prefix-cache snapshot points queue their copies behind
        the step; a prefill to export is finished by its first token, so no later step feeds it (`_follows`), and
        the state it keeps stands at its prompt's end when that lands. A step that would preempt lands the tokens
        first, is scheduled again, preempting, and launched. A row that finishes on a landed token has already been
        fed to the launched step, whose tokens for it are dropped."""
        launched, self._launched = self._launched, None
        ahead = None if launched is None else {s for s in launched.sequences if self._follows(s)}
        chunks = self.scheduler.schedule(ahead)
        landed: list[Request] = []
        if chunks is None:  # room only by preempting: the tokens land first, then a schedule that may preempt
            landed, launched = self._land(launched), None
            chunks = self.scheduler.schedule() or []  # None only with tokens in flight
        step = self.runner.launch(chunks, after=launched) if chunks else None
        self.scheduler.after_step(chunks)  # snapshots before finished sequences free their state
        if self.overlap:
            self._launched = step
            landed += self._land(launched)
            self._settle()
        elif step is not None:
            landed += self._land(step)
        return [self._output(seq) for seq in landed]

    def _retire(self, seq: Request) -> None:
        """A sequence finished by its newest token leaves the scheduler; a prefill to export keeps its state, which
        waits in `exported` for the caller's export (then `release`)."""
        self.scheduler.finish(seq, keep_state=seq.export_after_prefill)
        if seq.export_after_prefill:
            self.exported[seq.request_id] = seq

    @staticmethod
    def _follows(seq: Request) -> bool:
        """Whether a sequence of the launched step goes on to the next one: it is still running (landed tokens
        may finish it after that), it is no prefill to export (its first token, the one on its way, finishes it)
        and the tokens on their way (two after an MTP row's accepted draft) will not reach max_tokens."""
        on_way = 2 if seq.use_mtp else 1
        return not seq.finished and not seq.export_after_prefill and seq.num_generated + on_way < seq.params.max_tokens

    def _land(self, launched: LaunchedStep | None) -> list[Request]:
        """Append a launched step's tokens, once they are on the host, to its sequences still running; those (none
        without a launched step)."""
        if launched is None:
            return []
        landed = self.runner.land(launched, self._launched)
        for seq in landed:
            if seq.finished:
                self._retire(seq)
        return landed

    def _settle(self) -> None:
        """Drop a launched step none of whose sequences still runs (its tokens would all be dropped), so that an
        engine with no unfinished request holds nothing in flight."""
        if self._launched is not None and all(s.finished for s in self._launched.sequences):
            self._launched.wait()
            self._launched = None

    def _output(self, seq: Request) -> RequestOutput:
        first = self._sent[seq.request_id]
        new = seq.output_token_ids[first:]
        self._sent[seq.request_id] = seq.num_generated
        done = seq.finished
        if done:
            del self._sent[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            first_index=first,
            token_ids=new,
            text=seq.text.delta(final=done) if seq.text is not None else "",
            logprobs=seq.logprobs[first - seq.num_replayed :] if seq.logprobs else [],
            finished=done,
            finish_reason=seq.finish_reason,
        )

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[CompletionOutput]:
        """Run prompts (token ids) to completion; outputs in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        seqs = [
            self.add_request(f"generate-{i}-{secrets.token_hex(4)}", p, sp)
            for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))
        ]
        while any(not s.finished for s in seqs):
            self.step()
        return [
            CompletionOutput(
                request_id=s.request_id,
                prompt_token_ids=s.prompt_token_ids,
                token_ids=list(s.output_token_ids),
                text=s.text.text if s.text is not None else "",
                finish_reason=s.finish_reason,
                logprobs=list(s.logprobs),
            )
            for s in seqs
        ]
