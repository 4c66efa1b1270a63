"""The inputs of one batched decode step, as device tensors: what rank 0 of a rank group broadcasts
(`parallel/engine_group.py`).

A decode step over the paged pool needs, per row, the token it feeds, that token's position and the row's pool
slot (`DecodeInputs.rows`, [D, 3] int64; an MTP verification step adds each row's draft, [D, 4]) and the row's
block table (`block_tables`, [D, T] int32, gathered on the
device from the pool's tables); the sampler needs `sampler.SamplingInputs` (ints [R, 3], floats [R, 3]) and, on
the host, its `SamplingFlags`. With T and the flags (a few Python values) that is the whole step: every rank can
run `DeepseekV4.decode_paged` and `sampler.sample_batch` from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.model_runtime.engine.kv_state import KVPool, PagedSequenceState
from dsv4.model_runtime.engine.request import Request
from dsv4.model_runtime.engine.transfer import to_device
from dsv4.model_runtime.state import PagedDecode, PagedUndo

TOKEN, POSITION, SLOT, DRAFT = range(4)


def next_token(seq: Request) -> int:
    """The token a decoding sequence feeds: its last one (the only one its state does not hold)."""
    return seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]


def table_width(seqs: Sequence[Request], block_size: int, tokens: int = 1) -> int:
    """Block-table columns a step feeding `tokens` per row of `seqs` needs: the blocks holding each row's newest
    position."""
    return max((s.num_computed + tokens - 1) // block_size + 1 for s in seqs)


def verify_tokens(fed: torch.Tensor | None) -> int:
    """Positions past the host's count a verification step's rows may write: their token and draft, and with rows
    `fed` from a step still in flight (`DecodeInputs.verifying`) the accepted draft's token before them."""
    return 2 if fed is None else 3


@dataclass(frozen=True)
class DecodeInputs:
    """rows [D, 3] int64 (token id, position, pool slot), or [D, 4] with each row's MTP draft, and block_tables
    [D, T] int32 of one decode (or verification) step."""

    rows: torch.Tensor
    block_tables: torch.Tensor

    @classmethod
    def build(
        cls, seqs: Sequence[Request], pool: KVPool, width: int, drafts: bool = False, fed: bool = False
    ) -> DecodeInputs:
        """The inputs of decoding `seqs` (each with one uncomputed token; with `drafts`, and its MTP draft after
        it) with `width` block-table columns. `fed`: the step's rows are fed (`verifying`), so a row's draft may
        still be on the device (0 stands in its place)."""
        rows = to_device(_rows(seqs, drafts, fed), pool.block_tables.device)
        return cls(rows, pool.block_tables[rows[:, SLOT], :width])

    @classmethod
    def on_host(
        cls, seqs: Sequence[Request], pool: KVPool, width: int, drafts: bool = False, fed: bool = False
    ) -> DecodeInputs:
        """The same inputs on the host, read from the pool's host tables (`KVPool.mirror_block_tables`): what a
        rank group's leader sends, without waiting for the device."""
        tables = pool.host_block_tables
        assert tables is not None, "the pool keeps no host copy of its block tables"
        rows = _rows(seqs, drafts, fed)
        return cls(rows, tables[rows[:, SLOT], :width])

    def feeding(self, tokens: torch.Tensor) -> DecodeInputs:
        """The same step feeding `tokens` [D] (on the device) instead of the ids in `rows`: overlapped scheduling
        launches a step before the host knows the tokens it feeds, which the previous step is still drawing."""
        rows = torch.cat([tokens.to(self.rows.dtype)[:, None], self.rows[:, POSITION:]], dim=1)
        return DecodeInputs(rows, self.block_tables)

    def verifying(self, fed: torch.Tensor) -> DecodeInputs:
        """The same verification step with each row's token, position and draft from `fed` [D, 3] (on the device:
        the token, the positions to add to the host's, the draft): overlapped scheduling launches a verification
        step before the host knows how far the previous one moved its rows and what they drew."""
        fed = fed.to(self.rows.dtype)
        rows = torch.stack([fed[:, 0], self.rows[:, POSITION] + fed[:, 1], self.rows[:, SLOT], fed[:, 2]], dim=1)
        return DecodeInputs(rows, self.block_tables)

    def step(self, pool: KVPool) -> PagedDecode:
        """The model's view of the step over `pool` (a verification step's saves what its drafts overwrite)."""
        slots = self.rows[:, SLOT]
        undo = PagedUndo(slots, pool.sink_slot) if self.verifies else None
        return PagedDecode(self.rows[:, POSITION], slots, self.block_tables, pool.storage, undo)

    @property
    def verifies(self) -> bool:
        """Whether the rows carry MTP drafts (a verification step)."""
        return self.rows.shape[1] > DRAFT

    @property
    def token_ids(self) -> torch.Tensor:
        """[D]: the token each row feeds first."""
        return self.rows[:, TOKEN]

    @property
    def drafts(self) -> torch.Tensor:
        """[D]: each row's MTP draft (a verification step)."""
        return self.rows[:, DRAFT]

    @property
    def verify_ids(self) -> torch.Tensor:
        """[D, 2]: the token and the draft each row of a verification step feeds."""
        return torch.stack([self.rows[:, TOKEN], self.rows[:, DRAFT]], dim=1)


def _rows(seqs: Sequence[Request], drafts: bool, fed: bool) -> torch.Tensor:
    table: list[list[int]] = []
    for s in seqs:
        state = s.state
        assert isinstance(state, PagedSequenceState), f"{s.request_id} decodes without a paged KV state"
        row = [next_token(s), s.num_computed, state.slot]
        if drafts:
            assert s.draft is not None or fed, f"{s.request_id} verifies without a draft"
            row.append(s.draft if s.draft is not None else 0)
        table.append(row)
    return torch.tensor(table, dtype=torch.int64).view(-1, 4 if drafts else 3)
