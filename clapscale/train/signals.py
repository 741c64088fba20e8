"""Stop requests from SLURM: SIGTERM (preemption) and SIGUSR1 (time-limit warning, ``--signal``).

A handler only sets a flag; ranks agree at the next step boundary (``agreed``, an all-reduce), so
every rank saves the same checkpoint and stops at the same step even when the signal reached
only some of them.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """``with StopSignals(device) as stop: ... if stop.agreed(): break``; handlers restored on exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self) -> int | None:
        """Collective: the signal any rank received (the largest number), or None; every rank gets the same."""
        flag = torch.tensor([0 if self.received is None else int(self.received)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        # Return the reduced value even on a rank that got a signal of its own: SIGUSR1 here and
        # SIGTERM elsewhere must not make the ranks log different signals. When no rank had one,
        # ``received`` is left alone: a signal that landed during the all-reduce waits for the next call.
        if agreed:
            self.received = agreed
        return agreed or None
