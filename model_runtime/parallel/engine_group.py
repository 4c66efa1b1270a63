"""A rank group's engine: rank 0 (the leader) runs the real `LLMEngine`; every other rank (a follower) keeps a
mirror of its KV pool and replays its model calls on its own shard, so the collectives of the sharded layers
(`shard.py`) line up.

* The leader owns everything with a decision in it: the scheduler, the block and slot allocation, the prefix
  cache, the sampler, the tokenizer, and in a worker Redis, the handoff and /metrics. Its `LeaderRunner` sends
  every model call of a step to the followers before making it: the batched decode step (`DecodeCall`: the
  step's rows of token, position and slot, and its block tables) or one per-sequence feed (`FeedCall`: the ids,
  each row's slot, blocks and position, and which rows need logits). Sampling needs no collective (the head
  gathers the full vocabulary on every rank), so it runs on the leader alone and the followers learn the tokens
  from the next call's ids.
* Pool writes outside the forward pass travel with the next call, in order (`KVPool.journal`): slot resets, the
  prefix cache's slot and block copies, and restored imports (the verified snapshot itself). Allocation and
  frees write nothing: a follower's pool is storage addressed by the leader's block and slot ids.
* KV export needs no gather: the sharding keeps K=V, the compressors and the indexer whole on every rank (only
  query heads, output groups, experts and the vocabulary are split), so every rank's pool holds the whole state,
  the leader's export is the sequence's, and the blob (`kv_export`, fingerprinted without the layout) imports
  into any layout; an import is restored on every rank.
* Failures: a follower that dies or fails a call ends the group through the launcher (`launch.py`). A model call
  that fails on the leader after its followers were sent it leaves them inside a collective, and a call that cannot
  be sent means a follower is gone: either way the leader logs one line and exits (the callers' requests are not
  failed: their jobs are taken over), and the launcher ends the group, rather than serve from ranks out of step.

Not run in a group (refused or switched off by `group_config`): MTP speculative decoding (its draft and verify
calls are not sent) and CUDA graphs (a captured step would replay collectives the followers do not mirror).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from dsv4.model_runtime.engine.kv_state import KVPool, PagedSequenceState, PoolWrite
from dsv4.model_runtime.engine.llm_engine import EngineConfig, LLMEngine
from dsv4.model_runtime.engine.model_runner import ModelRunner
from dsv4.model_runtime.engine.step_inputs import DecodeInputs
from dsv4.model_runtime.models.deepseek_v4 import DeepseekV4
from dsv4.model_runtime.parallel.rank import RankContext
from dsv4.model_runtime.parallel.step_channel import StepChannel
from dsv4.model_runtime.placement import Layout
from dsv4.model_runtime.state import SequenceState
from dsv4.model_runtime.tokenizer import Tokenizer

log = logging.getLogger("dsv4.model_runtime.parallel")

BROKEN_EXIT = 70  # the leader's exit status when a call failed after its followers were sent it


class GroupUnsupported(ValueError):
    """An engine setting that a rank group does not run; the message names it."""


@dataclass(frozen=True)
class DecodeCall:
    """The batched decode step: `DecodeInputs.rows` [D, 3] and `block_tables` [D, T], on the CPU."""

    rows: torch.Tensor
    block_tables: torch.Tensor


@dataclass(frozen=True)
class FeedCall:
    """A per-sequence feed of ids [B, n] (CPU); per row its (slot, blocks, position); the rows that need logits."""

    ids: torch.Tensor
    states: list[tuple[int, tuple[int, ...], int]]
    rows: list[int]


@dataclass(frozen=True)
class Stop:
    """The leader is done: followers return."""


@dataclass(frozen=True)
class Message:
    """The pool writes since the previous message, then one call."""

    writes: list[PoolWrite]
    call: DecodeCall | FeedCall | Stop


def group_config(config: EngineConfig) -> EngineConfig:
    """`config` as a rank group runs it: GroupUnsupported for MTP speculative decoding, CUDA graphs off."""
    if config.speculative_mtp:
        raise GroupUnsupported(
            "MTP speculative decoding does not run in a rank group (its draft and verify calls are not mirrored to "
            "the followers); turn it off or run one rank"
        )
    return replace(config, cuda_graphs=False)


class LeaderRunner(ModelRunner):
    """Rank 0's model runner: every model call goes to the followers first, with the pool writes before it."""

    def __init__(self, model: DeepseekV4, pool: KVPool, channel: StepChannel) -> None:
        super().__init__(model)
        self.pool, self.channel = pool, channel
        pool.journal = []

    def _publish(self, call: DecodeCall | FeedCall | Stop) -> None:
        writes, self.pool.journal = self.pool.journal or [], []
        self.channel.publish(Message(writes, call))

    def forward_decode(self, inputs: DecodeInputs, pool: KVPool) -> torch.Tensor:
        try:
            self._publish(DecodeCall(inputs.rows.cpu(), inputs.block_tables.cpu()))
            return super().forward_decode(inputs, pool)
        except Exception as e:
            _broken(e)

    def forward_feed(
        self, ids: torch.Tensor, states: list[SequenceState], rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        described = []
        for st in states:
            assert isinstance(st, PagedSequenceState), "a rank group's sequences live in the paged pool"
            described.append((st.slot, tuple(st.table), st.position))
        try:
            self._publish(FeedCall(ids.cpu(), described, rows))
            return super().forward_feed(ids, states, rows)
        except Exception as e:
            _broken(e)

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
    every call to the followers); on a follower it only holds the model and the mirrored pool, for `follow`."""

    ctx: RankContext
    engine: LLMEngine
    channel: StepChannel

    @property
    def is_leader(self) -> bool:
        return self.ctx.is_leader

    def follow(self) -> None:
        """A follower's loop: apply the leader's pool writes and replay its model calls until it stops."""
        # The same runner calls the leader makes, so both sides run one definition of each call.
        model, pool, runner = self.engine.model, self.engine.kv.pool, self.engine.runner
        with torch.no_grad():
            while True:
                message: Message = self.channel.receive()
                for write in message.writes:
                    _apply(model, pool, write)
                call = message.call
                if isinstance(call, Stop):
                    return
                if isinstance(call, DecodeCall):
                    inputs = DecodeInputs(call.rows.to(model.device), call.block_tables.to(model.device))
                    runner.forward_decode(inputs, pool)
                    continue
                states: list[SequenceState] = [_state(pool, *described) for described in call.states]
                runner.forward_feed(call.ids.to(model.device), states, call.rows)

    def stop(self) -> None:
        """The leader is done stepping: end the followers' loops."""
        runner = self.engine.runner
        assert isinstance(runner, LeaderRunner), "only the leader stops the group"
        runner.stop()


def _state(pool: KVPool, slot: int, blocks: tuple[int, ...], position: int) -> PagedSequenceState:
    state = PagedSequenceState(pool, slot)
    state.table.extend(blocks)
    state.position = position
    return state


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

    cfg = group_config(config or EngineConfig())
    channel = StepChannel()
    model, _ = load_rank(path, layout, ctx.rank, ctx.device, dtype, qat_simulation)
    tokenizer = Tokenizer.from_pretrained(path) if ctx.is_leader else None
    engine = LLMEngine(model, tokenizer, cfg)
    if ctx.is_leader:
        engine.runner = LeaderRunner(model, engine.kv.pool, channel)
    # Every rank has loaded before any returns: a leader that reports ready serves with a whole group.
    dist.barrier()
    log.info(
        "rank %d of %d: %s engine ready (%s)",
        ctx.rank,
        ctx.world_size,
        "leader" if ctx.is_leader else "follower",
        layout.describe(),
    )
    return RankEngine(ctx, engine, channel)
