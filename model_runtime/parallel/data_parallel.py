"""Data-parallel attention: the process groups of a layout with several tensor-parallel groups, and the row
exchange between those groups.

A layout of `dp` groups of `tp` ranks (`placement.Layout`) runs each group's attention, embedding and head on its
own rows (the sequences whose KV it holds), tensor parallel inside the group. The groups meet in two places:

* the MoE, under expert parallelism (ep = world): every rank gathers the tokens of all groups from its peers
  (the ranks holding the same tensor index in the other groups), computes the (token, expert) pairs of its own
  experts for all of them, and the sum over the world gives every rank every token's output, of which it keeps
  its group's rows. Without expert parallelism each group holds every expert's tensor shard and its MoE stays
  inside the group.
* the logits of a call, which the engine's leader samples: every group's rows are gathered the same way.

A group with no rows in a call still takes part in those exchanges (`shard.idle_pass`), with zero rows, so the
collectives of every rank line up. The engine sets each call's rows per group (`DataParallel.counts`) before it
runs the model; every rank knows them from the leader's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dsv4.model_runtime.placement import Layout


def _new_groups(members: list[list[int]], rank: int) -> dist.ProcessGroup:
    """The group of `members` that holds `rank`; every rank creates every group, in the same order (the
    `dist.new_group` contract)."""
    mine: dist.ProcessGroup | None = None
    for ranks in members:
        group = dist.new_group(ranks)
        if rank in ranks:
            assert isinstance(group, dist.ProcessGroup)
            mine = group
    assert mine is not None, f"rank {rank} is in none of {members}"
    return mine


@dataclass
class DataParallel:
    """This rank's place in a data-parallel-attention layout: its tensor-parallel group (`tp_group`), its peers in
    the other groups (`peers`, ordered by group), and the rows each group has in the current model call."""

    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup
    peers: dist.ProcessGroup
    counts: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, layout: Layout, rank: int) -> DataParallel:
        """Create the layout's process groups (every rank of the world calls this at the same point)."""
        tp, dp = layout.tp, layout.dp
        tp_group = _new_groups([[g * tp + t for t in range(tp)] for g in range(dp)], rank)
        peers = _new_groups([[g * tp + t for g in range(dp)] for t in range(tp)], rank)
        return cls(layout, rank, tp_group, peers)

    @property
    def group(self) -> int:
        """This rank's data-parallel group."""
        return self.layout.dp_rank(self.rank)

    @property
    def gathers_moe(self) -> bool:
        """Whether the MoE runs over the tokens of every group (expert parallel over the world)."""
        return self.layout.ep > 1

    def set_rows(self, counts: list[int]) -> None:
        """The rows (tokens, for the MoE) of each group in the next model call."""
        if len(counts) != self.layout.dp:
            raise ValueError(f"data parallel: {len(counts)} row counts for {self.layout.dp} groups")
        self.counts = list(counts)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This group's rows `local` [counts[group], ...] -> every group's rows, concatenated in group order."""
        mine = self.counts[self.group]
        if local.shape[0] != mine:
            raise ValueError(f"data parallel: {local.shape[0]} rows, the call gives this group {mine}")
        width = max(self.counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in self.counts]
        dist.all_gather(parts, padded, group=self.peers)
        return torch.cat([p[:n] for p, n in zip(parts, self.counts, strict=True)])

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This group's rows of every group's rows `rows` (as `gather` orders them)."""
        first = sum(self.counts[: self.group])
        return rows[first : first + self.counts[self.group]]
