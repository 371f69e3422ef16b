"""train.profile_steps=N: a torch.profiler trace of N training steps, after WARMUP_STEPS steps, on the main process.

Writes <run dir>/profile/trace.json (open it in https://ui.perfetto.dev or chrome://tracing) and
<run dir>/profile/top_ops.txt (the operators that took the most time, also printed). The profiler only records
timings: the run's numbers are those of the same run without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..storage.checkpoint import atomic_write_text

WARMUP_STEPS = 5  # the first steps pay for allocations and, on a GPU, kernel selection: not what a profile is for
TOP_OPERATORS = 25


class StepProfiler:
    """Call step() after every training step; does nothing when off (N = 0) or on the other processes."""

    def __init__(self, steps: int, run_dir: Path, device: torch.device, console, enabled: bool = True):
        self.profile = None
        if not (steps and enabled):
            return
        self.folder, self.console, self.steps = Path(run_dir) / "profile", console, steps
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch's tracer: its errors only (no GPU here, ...)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.profile = torch.profiler.profile(
            activities=activities, on_trace_ready=self._write,
            schedule=torch.profiler.schedule(wait=0, warmup=WARMUP_STEPS, active=steps, repeat=1))
        self.profile.start()

    def step(self) -> None:
        if self.profile is not None:
            self.profile.step()

    def stop(self) -> None:
        """At the end of the run (or of this start): a profile cut short by it is written as far as it got."""
        if self.profile is not None:
            self.profile.stop()
            self.profile = None

    def _write(self, profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f".trace.json.tmp-{os.getpid()}"
        # torch writes the trace by name: never through a link left there (vae.storage.files)
        trace.unlink(missing_ok=True)
        profile.export_chrome_trace(str(trace))
        trace.replace(self.folder / "trace.json")
        table = profile.key_averages().table(sort_by=self.sort_by, row_limit=TOP_OPERATORS)
        atomic_write_text(self.folder / "top_ops.txt", table + "\n")
        self.console.info(f"profile of {self.steps} steps after {WARMUP_STEPS} of warm-up: "
                          f"{self.folder / 'trace.json'} (open it in https://ui.perfetto.dev); the top operators, "
                          f"also in {self.folder / 'top_ops.txt'}:")
        self.console.print(table)
