"""An epoch's speed and memory, per process: how long the loop waited for its batches, and the peak memory.

The batches are indices into a dataset already in memory (on the GPU where there is one), so "waiting for data"
is the time the loop spent getting the next batch from the sampler, not the gather of the images, which is part
of the step. Peak memory is CUDA's max_memory_allocated on a GPU (what tensors took, since the process began) and
the process's peak resident memory on a CPU.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator

import torch


class DataWait:
    """Times the loop's waits for its next batch."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def over(self, batches: Iterable) -> Iterator:
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - started
            yield batch


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class StartupClock:
    """Where a start's time goes before its first training step, phase by phase (summary.json's startup_s)."""

    def __init__(self) -> None:
        import psutil  # an accelerate dependency

        self.started = time.perf_counter()
        # The interpreter, its imports and the config, before train() began
        self.phases = {"imports": max(0.0, time.time() - psutil.Process().create_time())}
        self._last = self.started

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> dict:
        """The phases marked, and the total from the process's start to the last mark."""
        return {**self.phases, "total": self.phases["imports"] + self._last - self.started}
