"""Stopping cleanly: SIGUSR1 (Slurm's warning before a time limit or preemption), SIGTERM and Ctrl-C.

A handler only raises a flag; the training loop looks at it after each step (all processes agree through a
small all-reduce), writes a full checkpoint mid-epoch and exits. Under Slurm, SIGUSR1 also requeues the job so
that it resumes from that checkpoint. A second Ctrl-C interrupts at once; checkpoints are written atomically, so
the last complete one is never damaged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from .errors import TrainingError

HANDLED = ("SIGUSR1", "SIGTERM", "SIGINT")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138}


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; nothing to catch then
        for name in HANDLED:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = self.signal_name or name


def slurm_job_id() -> str | None:
    # An array task is requeued under its own id (JOBID_TASKID), which SLURM_JOB_ID already is.
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> str:
    """Ask Slurm to put this job back in the queue; returns what happened, in words."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not requeue Slurm job {job_id} ({e}); resubmit it to resume"
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()[0]
        return f"could not requeue Slurm job {job_id} ({reason}); resubmit it to resume"
    return f"requeued Slurm job {job_id}; it resumes from this checkpoint"


def leave_after_checkpoint(stop: StopRequest, accelerator, saved: Path, where: str) -> None:
    """After the checkpoint of a requested stop (every process calls this): under Slurm, SIGUSR1 requeues the job;
    then every process leaves with one line saying where the run stopped and how it goes on, and the signal's
    exit code."""
    message = f"stopped by {stop.signal_name} at {where}; saved {saved}"
    job = slurm_job_id()
    if stop.signal_name == "SIGUSR1" and job:
        if accelerator.is_main_process:
            message += "; " + requeue_slurm_job(job)
    elif job:  # SIGTERM from Slurm: scancel, preemption, a time limit, or its own requeue
        message += "; if Slurm requeues the job it resumes from here, else submit the same command again"
    else:
        message += "; run the same command again to resume"
    accelerator.wait_for_everyone()
    error = TrainingError(message)
    error.exit_code = EXIT_CODES.get(stop.signal_name, 1)
    raise error
