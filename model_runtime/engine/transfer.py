"""Host <-> device copies of the engine's step inputs and outputs, arranged so that a step blocks the host once.

Inputs go through pinned memory with a non-blocking copy (a pageable copy to a GPU makes PyTorch wait for the
stream). The step's results come back in one copy, after which the host waits for the copy alone (an event
recorded behind it), not for the whole stream: with overlapped scheduling the next step is queued behind it by
then. On the CPU both are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without waiting for the device's queued work."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class HostCopy:
    """A device tensor's values on their way to the host: `wait()` gives them once the copy is done."""

    host: torch.Tensor
    done: torch.cuda.Event | None = None  # recorded after the copy; None when the copy was synchronous

    def wait(self) -> torch.Tensor:
        """The host values, after waiting for the copy (and the work queued before it), not for later work."""
        if self.done is not None:
            self.done.synchronize()
        return self.host


def start_copy_to_host(t: torch.Tensor) -> HostCopy:
    """Queue the copy of device tensor `t` to the host and return at once (CUDA); a synchronous copy elsewhere
    (torch_npu: its pinned copies and events are untested on hardware, so the plain copy is kept)."""
    if t.device.type == "cpu":
        return HostCopy(t)
    if t.device.type != "cuda":
        return HostCopy(t.cpu())
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return HostCopy(host, done)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The values of device tensor `t` on the host: one copy, then the wait for the work that computes them."""
    return start_copy_to_host(t).wait()
