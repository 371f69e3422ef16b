"""Stopping cleanly: SIGUSR1 or SIGUSR2 (Slurm's warning before a time limit or preemption, as the job's
--signal chose), SIGTERM and Ctrl-C.

A handler only raises a flag; the training loop looks at it after each step (all processes agree through a
small all-reduce), writes a full checkpoint mid-epoch and exits. Under Slurm, the warning signal also requeues
the job so that it resumes from that checkpoint. A second Ctrl-C interrupts at once; so does a second SIGTERM
(torchrun's agent and Slurm send TERM, then KILL: a process blocked in a collective whose peer is gone never
gets to look at the flag). Checkpoints are written atomically, so the last complete one is never damaged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import TrainingError

HANDLED = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
WARNINGS = ("SIGUSR1", "SIGUSR2")  # Slurm's notice before the end (--signal=B:USR1@180): checkpoint and requeue
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138, "SIGUSR2": 140}
# SIGTERMs closer together than this are one request: under Slurm the same TERM reaches a process from Slurm
# itself, from the batch script and from torchrun's agent within milliseconds of each other.
SAME_TERM_S = 2.0


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int] | None = None  # the pipe the second-SIGTERM watcher reads

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
        self._watch_for_a_second_term()
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])  # the watcher reads the end of the pipe and leaves
            self._wakeup = None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = self.signal_name or name

    def _watch_for_a_second_term(self) -> None:
        """Python runs a signal handler only when the main thread gets back to Python code, which a collective
        waiting for a dead or stopped peer may never do. Python's C-level handler also writes each signal's
        number to a "wakeup" file descriptor: a thread reading it sees a second SIGTERM even then, and leaves."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="second-sigterm", daemon=True).start()

    def _watch(self, read_fd: int) -> None:
        first_term = None
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(64):
                for signum in chunk:
                    if signum != signal.SIGTERM:
                        continue
                    now = time.monotonic()
                    if first_term is None:
                        first_term = now
                    elif now - first_term >= SAME_TERM_S:
                        _leave_at_once()


def _leave_at_once() -> None:
    print(f"error: (process rank {os.environ.get('RANK', '0')}) a second SIGTERM: leaving at once without a "
          f"checkpoint; the newest complete one is kept, and the same command resumes from it", file=sys.stderr,
          flush=True)
    os._exit(EXIT_CODES["SIGTERM"])


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


class StoppedToResume(TrainingError):
    """A requested stop, after its checkpoint: one line saying where the run stopped and how it goes on, the
    signal's exit code, and, for Slurm's warning signal, the job to requeue once the process has finished its
    other business (W&B above all: a requeue sends SIGTERM to every process of the job, wandb's service among
    them, so it comes last)."""

    def __init__(self, message: str, signal_name: str | None, requeue_job: str | None):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signal_name, 1)
        self.requeue_job = requeue_job

    def requeue(self) -> None:
        """Ask Slurm to requeue the job (if this process should) and add what happened to the message."""
        if self.requeue_job:
            self.args = (f"{self.args[0]}; {requeue_slurm_job(self.requeue_job)}",)
            self.requeue_job = None


def leave_after_checkpoint(stop: StopRequest, accelerator, saved: Path, where: str) -> None:
    """After the checkpoint of a requested stop (every process calls this): raise StoppedToResume. Under Slurm,
    the warning signal (SIGUSR1 or SIGUSR2) asks the main process to requeue
    the job (StoppedToResume.requeue, called by the training once W&B
    is finished)."""
    message = f"stopped by {stop.signal_name} at {where}; saved {saved}"
    job, requeue_job = slurm_job_id(), None
    if stop.signal_name in WARNINGS and job:
        requeue_job = job if accelerator.is_main_process else None
    elif job:  # SIGTERM from Slurm: scancel, preemption, a time limit, or its own requeue
        message += "; if Slurm requeues the job it resumes from here, else submit the same command again"
    else:
        message += "; run the same command again to resume"
    accelerator.wait_for_everyone()
    raise StoppedToResume(message, stop.signal_name, requeue_job)
