"""Host <-> device copies of the engine's step inputs and outputs, arranged so that a step blocks the host once.

Inputs go through pinned memory with a non-blocking copy (a pageable copy to a GPU makes PyTorch wait for the
stream). The step's results come back in one copy, after which the host waits for the stream: the step's only
host synchronization. On the CPU both are no-ops.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without waiting for the device's queued work."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The values of device tensor `t` on the host: one copy, then the wait for the stream that computes them."""
    if t.device.type == "cpu":
        return t
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host
