"""Where a step's wall time and memory go: a timer per phase, and the peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the phases of a training step, in order (logged as time/<phase>_s)
PHASES = ("rollout", "teacher", "student", "optimizer", "sync")


class PhaseClock:
    """Wall time per phase of a step; waits for queued GPU work so each phase is charged its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to ``name`` (added up over the step)."""
        start = self._now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self._now() - start

    def total(self) -> float:
        return sum(self.seconds.values())


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
