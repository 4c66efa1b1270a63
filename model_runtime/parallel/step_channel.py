"""The leader's line to the followers of a rank group: one pickled message per model call, broadcast from rank 0,
and a follower's answer to the leader (a KV export of its data-parallel group's sequence).

A message travels on a gloo group of its own (CPU tensors whatever the device of the ranks: the messages are small
host data, and the model's collectives keep the default group), as two broadcasts: its length, then its bytes.
The group's timeout is long because a follower waits in `receive` for as long as its leader has no work; a leader
that dies is noticed anyway (its connections close, and the launcher stops the group).
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

IDLE_TIMEOUT = datetime.timedelta(days=7)  # how long a follower may wait for its leader's next step


def _frame(message: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A message as it travels: its length [1] int64, then its pickled bytes."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.tensor([len(data)], dtype=torch.int64), torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _receive(move: Callable[[torch.Tensor], object]) -> Any:
    """A message whose length, then bytes, `move` fills in (a broadcast or a point-to-point receive)."""
    size = torch.zeros(1, dtype=torch.int64)
    move(size)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    move(data)
    return pickle.loads(data.numpy().tobytes())


class StepChannel:
    """Rank 0 publishes, every other rank receives the same messages in the same order. Every rank of the default
    group must construct it at the same point (it creates a process group)."""

    def __init__(self, timeout: datetime.timedelta = IDLE_TIMEOUT) -> None:
        group = dist.new_group(backend="gloo", timeout=timeout)
        assert isinstance(group, dist.ProcessGroup), "every rank is a member of the channel's group"
        self.group = group
        self.is_leader = dist.get_rank() == 0

    def publish(self, message: Any) -> None:
        """Send `message` (picklable; tensors on the CPU) to every follower (rank 0 only)."""
        assert self.is_leader, "only rank 0 publishes"
        for t in _frame(message):
            dist.broadcast(t, src=0, group=self.group)

    def receive(self) -> Any:
        """The leader's next message (followers only; blocks until it comes)."""
        assert not self.is_leader, "rank 0 publishes, it never receives"
        return _receive(lambda t: dist.broadcast(t, src=0, group=self.group))

    def send_to_leader(self, message: Any) -> None:
        """Send `message` to rank 0 alone (a follower's answer to the call it was just sent)."""
        assert not self.is_leader, "rank 0 does not send to itself"
        for t in _frame(message):
            dist.send(t, dst=0, group=self.group)

    def receive_from(self, rank: int) -> Any:
        """The message rank `rank` sends the leader with `send_to_leader` (rank 0 only; blocks until it comes)."""
        assert self.is_leader, "only rank 0 receives a follower's answer"
        return _receive(lambda t: dist.recv(t, src=rank, group=self.group))
