"""One rank of a group engine run (a launcher target): every rank builds its part of the engine; the leader runs
the work of `work.pt` and saves what came out, the followers replay its calls until it stops them.

args: checkpoint, layout ("tp" or "tp,ep"; tp < world is data-parallel attention), work file, output folder. The
work (torch.save'd dict; each item optional):

* "rounds": lists of prompts generated greedily round after round (later rounds extend earlier prompts, so they
  resume from prefix-cache entries: slot and block copies on the followers);
* "import": (prompt, token 0, KV blob) of a sequence prefilled elsewhere, continued here;
* "export": a prompt prefilled here, whose token 0 and KV blob are saved;
* "prefix": (prefix tokens, KV blob, prompt) an aligned prefix imported into the cache, then a prompt extending it;
* "concurrent": (imports, exports) sequences run at the same time, so that data-parallel groups share them out:
  each import (prompt, token 0, KV blob) continues, each export prompt is prefilled and its blob saved;
* "mtp": [(prompt, its greedy tokens)]: the engine runs MTP speculative decoding and these prompts are generated
  first, with oracle drafts (`with_oracle_drafts`);
* "config": EngineConfig fields that replace CONFIG's (e.g. a small pool);
* "graphs": decode and verification steps go through `DecodeGraphs` on every rank (padded to buckets; eager at
  "replay" on a CPU).

With "config": {"overlap_scheduling": True} the leader also saves "fed_steps": how many decode steps were launched
feeding the tokens of a step still in flight.

Every rank writes out/graphs<rank>.pt and out/verify_graphs<rank>.pt, the shapes of the decode and verification
graphs it ran. The leader writes out/result.pt:
the tokens of each, the prefill tokens computed and the prefix cache's hits, and for "concurrent" the
data-parallel group each sequence ran in.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dsv4.model_runtime.engine import kv_export
from dsv4.model_runtime.engine.kv_groups import GroupKV
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.model_runner import LaunchedStep
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.sampling_params import SamplingParams
from dsv4.model_runtime.engine.scheduler import ScheduledChunk
from dsv4.model_runtime.engine.speculative import VerifyStep
from dsv4.model_runtime.parallel.engine_group import load_rank_engine
from dsv4.model_runtime.parallel.rank import RankContext
from dsv4.model_runtime.placement import Layout
from dsv4.model_runtime.weights import load_model

# The engine of the tests (tests compare against a one-process engine with the same settings): blocks of 8 positions
# and a 16-token step budget, so prompts cross blocks and prefills run in chunks beside decode steps.
CONFIG = EngineConfig(block_size=8, max_num_batched_tokens=16, num_blocks=256, prefix_cache_slots=16)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def random_tokens(n: int, seed: int) -> list[int]:
    """n token ids drawn from `seed` (the tests' prompts)."""
    return torch.randint(3, 128000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def one_process_engine(ckpt: str | Path) -> LLMEngine:
    """The one-process engine the groups are compared with: the same settings, float64."""
    return LLMEngine(load_model(ckpt, dtype=torch.float64), None, CONFIG)


def run_to_end(engine: LLMEngine, request_id: str) -> list[int]:
    """Step until the request finishes; its generated tokens."""
    seq = engine.scheduler.get(request_id)
    assert seq is not None
    while not seq.finished:
        engine.step()
    return list(seq.output_token_ids)


def prefill_export(engine: LLMEngine, prompt: list[int]) -> tuple[int, bytes]:
    """Prefill `prompt`, sample token 0 and export the state: (token 0, KV blob)."""
    seq = engine.add_request("export", prompt, GREEDY, export_after_prefill=True)
    while not seq.finished:
        engine.step()
    assert seq.state is not None
    blob = kv_export.export_state(engine.model, seq.state)
    engine.release(engine.exported.pop("export"))
    return seq.output_token_ids[0], blob


def continue_import(engine: LLMEngine, prompt: list[int], token0: int, blob: bytes) -> list[int]:
    """Import a prefilled state and continue after its token 0; all the tokens, token 0 first."""
    engine.add_request("import", prompt, GREEDY, output_token_ids=[token0], snapshot=kv_export.load(engine.model, blob))
    return run_to_end(engine, "import")


def concurrent(
    engine: LLMEngine, imports: list[tuple[list[int], int, bytes]], exports: list[list[int]]
) -> dict[str, object]:
    """Run imports and exports side by side: the continued imports' tokens, the exports' (token 0, KV blob), and
    the data-parallel group of each sequence (imports first)."""
    seqs = [
        engine.add_request(f"import{k}", p, GREEDY, output_token_ids=[t], snapshot=kv_export.load(engine.model, b))
        for k, (p, t, b) in enumerate(imports)
    ]
    seqs += [engine.add_request(f"export{k}", p, GREEDY, export_after_prefill=True) for k, p in enumerate(exports)]
    groups = [-1] * len(seqs)
    while not all(s.finished for s in seqs):
        engine.step()
        for k, s in enumerate(seqs):
            if groups[k] < 0 and isinstance(engine.kv, GroupKV):
                groups[k] = engine.kv.group_of(s)
    exported = []
    for k in range(len(exports)):
        seq = engine.exported.pop(f"export{k}")
        assert seq.state is not None
        blob = b"".join(engine.runner.export_chunks(seq.state, 1 << 16, seq.draft))
        exported.append((seq.output_token_ids[0], blob))
        engine.release(seq)
    return {"groups": groups, "imports": [s.output_token_ids for s in seqs[: len(imports)]], "exports": exported}


def with_oracle_drafts(engine: LLMEngine, truth: list[list[int]]) -> dict[str, object]:
    """Generate the prompts `truth` was generated from with MTP drafts replaced as in test_mtp.py's OracleRunner:
    the true next token every other time, else a wrong one (the random model's own drafts are all rejected), so
    both verification outcomes run; the tokens and the draft counters."""
    prompts = [t[0] for t in truth]
    answers = {f"o{i}": t[1] for i, t in enumerate(truth)}
    runner, turn = engine.runner, [0]

    def propose(s: Request, draft: int) -> None:
        right = answers[s.request_id][s.num_generated] if s.num_generated < len(answers[s.request_id]) else 0
        turn[0] += 1
        s.draft = right if turn[0] % 2 else (right + 1) % 128000

    runner._propose = propose  # type: ignore[method-assign]
    seqs = [engine.add_request(f"o{i}", p, GREEDY) for i, p in enumerate(prompts)]
    one_group = 0  # verification steps whose rows all live in one data-parallel group (the other has none)
    verify_logits = runner.verify_logits

    def counted(rows: list[Request], fed: torch.Tensor | None = None) -> VerifyStep:
        nonlocal one_group
        kv = engine.kv
        one_group += isinstance(kv, GroupKV) and len({kv.group_of(s) for s in rows}) < len(kv.pools)
        return verify_logits(rows, fed)

    runner.verify_logits = counted  # type: ignore[method-assign]
    while engine.has_unfinished():
        engine.step()
    del runner._propose, runner.verify_logits  # the model's own drafts from here on
    return {
        "tokens": [s.output_token_ids for s in seqs],
        "proposed": runner.drafts.proposed,
        "accepted": runner.drafts.accepted,
        "one_group_verifies": one_group,
    }


def main(ctx: RankContext, args: list[str]) -> None:
    ckpt, layout_arg, work_file, out = args
    torch.set_num_threads(1)
    tp, _, ep = layout_arg.partition(",")
    layout = Layout(world=ctx.world_size, tp=int(tp), ep=int(ep or 1))
    work = torch.load(work_file)
    config = replace(CONFIG, speculative_mtp="mtp" in work, **work.get("config", {}))
    part = load_rank_engine(ctx, ckpt, layout, dtype=torch.float64, config=config)
    if work.get("graphs"):  # the engine turns graphs off on a CPU; the padded steps run eagerly at "replay"
        part.engine.runner.cuda_graphs = True
    if not part.is_leader:
        part.follow()
        _save_graph_shapes(part.engine, ctx.rank, Path(out))
        return
    engine = part.engine
    result: dict[str, object] = {}
    fed_steps = _count_fed_steps(engine)
    if "mtp" in work:
        result["mtp"] = with_oracle_drafts(engine, work["mtp"])
    if "rounds" in work:
        result["rounds"] = [[c.token_ids for c in engine.generate_ids(ps, GREEDY)] for ps in work["rounds"]]
        result["preemptions"] = engine.scheduler.num_preemptions
        graphs = engine.runner.graphs
        result["graph_shapes"] = graphs.shapes if graphs is not None else []
    if "import" in work:
        prompt, token0, blob = work["import"]
        result["import"] = continue_import(engine, prompt, token0, blob)
    if "export" in work:
        result["export"] = prefill_export(engine, work["export"])
    if "prefix" in work:
        prefix, prefix_blob, extended = work["prefix"]
        assert engine.import_prefix(prefix, kv_export.load(engine.model, prefix_blob))
        before = engine.stats_extra()["prefill_tokens"]
        result["prefix"] = engine.generate_ids([extended], GREEDY)[0].token_ids
        result["prefix_prefill_tokens"] = engine.stats_extra()["prefill_tokens"] - before
        result["hits"] = engine.stats_extra()["prefix_cache_hits"]
    if "concurrent" in work:
        result["concurrent"] = concurrent(engine, *work["concurrent"])
    if engine.overlap:
        result["fed_steps"] = len(fed_steps)
    part.stop()
    _save_graph_shapes(engine, ctx.rank, Path(out))
    torch.save(result, Path(out) / "result.pt")


def _save_graph_shapes(engine: LLMEngine, rank: int, out: Path) -> None:
    """The (batch bucket, table width) of the graphs this rank ran, in out/graphs<rank>.pt."""
    graphs = engine.runner.graphs
    torch.save(graphs.shapes if graphs is not None else [], out / f"graphs{rank}.pt")
    torch.save(graphs.verify_shapes if graphs is not None else [], out / f"verify_graphs{rank}.pt")


def _count_fed_steps(engine: LLMEngine) -> list[None]:
    """One item per step the engine launches with a row fed by a step still in flight, from here on."""
    fed: list[None] = []
    launch = engine.runner.launch

    def counted(chunks: list[ScheduledChunk], after: LaunchedStep | None = None) -> LaunchedStep | None:
        if after is not None and any(after.holds(c.seq) for c in chunks):
            fed.append(None)
        return launch(chunks, after)

    engine.runner.launch = counted  # type: ignore[method-assign]
    return fed
