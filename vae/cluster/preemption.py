"""Stopping cleanly: SIGUSR1 or SIGUSR2 (Slurm's warning before a time limit or preemption, as the job's
--signal chose), SIGTERM and Ctrl-C.

A handler only raises a flag; the training loop looks at it after each step (all processes agree through a
small all-reduce), writes a full checkpoint mid-epoch and exits. Under Slurm, the warning signal also requeues
the job so that it resumes from that checkpoint. A second Ctrl-C interrupts at once; so does a second SIGTERM
(torchrun's agent and Slurm send TERM, then KILL: a process blocked in a collective whose peer is gone never
gets to look at the flag). Checkpoints are written atomically, so the last complete one is never damaged.
The handlers are in place from the start of the run's start-up: a warning then stops the run before its first
step, and the run directory's starts.jsonl counts such starts, so that a job whose time limit is too short for
its start-up is not requeued for ever.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import TrainingError
from ..storage.files import open_append
from .exit_records import record_exit

HANDLED = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
WARNINGS = ("SIGUSR1", "SIGUSR2")  # Slurm's notice before the end (--signal=B:USR1@180): checkpoint and requeue
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR1": 138, "SIGUSR2": 140}
POLL_STEPS = 10  # with several processes, how often they agree on whether a stop was requested
# SIGTERMs closer together than this are one request: under Slurm the same TERM reaches a process from Slurm
# itself, from the batch script and from torchrun's agent within milliseconds of each other.
SAME_TERM_S = 2.0


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None  # the first signal this process got
        self.agreed_signal: str | None = None  # with several processes: the stop's signal, the same on each
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

    def agreed(self, accelerator, step: int, every_step: bool = False, warnings_only: bool = False) -> bool:
        """True on every process once any of them was asked to stop (with several processes checked every
        POLL_STEPS steps, through a small all-gather); warnings_only: asked by Slurm's warning signal. The stop
        then carries one signal on every process (stop_signal): the first asked process's, by rank order."""
        requested = self.signal_name in WARNINGS if warnings_only else self.requested
        if accelerator.num_processes == 1:
            return requested
        if step % POLL_STEPS and not every_step:
            return False
        import torch  # here, not above: the Slurm scripts read this module's records without loading torch

        mine = HANDLED.index(self.signal_name) + 1 if requested else 0  # 0: not asked
        said = accelerator.gather(torch.tensor([mine], device=accelerator.device)).tolist()
        first = next((code for code in said if code), 0)
        if first:
            self.agreed_signal = HANDLED[first - 1]
        return first > 0

    @property
    def stop_signal(self) -> str | None:
        """The signal this process stops for: the one all processes agreed on, else its own."""
        return self.agreed_signal or self.signal_name

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
    record_exit(EXIT_CODES["SIGTERM"])
    os._exit(EXIT_CODES["SIGTERM"])


def slurm_job_id() -> str | None:
    # An array task is requeued under its own id (JOBID_TASKID), which SLURM_JOB_ID already is.
    return os.environ.get("SLURM_JOB_ID") or None


# scontrol runs inside the job, so the requeue's own SIGTERM to every process of the job can reach it before it
# exits: the job was requeued, but scontrol died (exit -15) and the run said it was not. It runs with TERM ignored
# (a shell's `trap '' TERM` survives exec; nothing runs between fork and exec in this threaded process).
REQUEUE_COMMAND = ("sh", "-c", "trap '' TERM; exec scontrol requeue \"$1\"", "requeue")


def requeue_slurm_job(job_id: str) -> str:
    """Ask Slurm to put this job back in the queue; returns what happened, in words."""
    try:
        result = subprocess.run([*REQUEUE_COMMAND, job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not requeue Slurm job {job_id} ({e}); resubmit it to resume"
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()[0]
        return f"could not requeue Slurm job {job_id} ({reason}); resubmit it to resume"
    return f"requeued Slurm job {job_id}; its next start resumes from the newest checkpoint"


# The run directory's record of its starts and requested stops, one JSON line each. A stop that trained no step
# (the warning came while the run was still starting) is "without progress"; after MAX_STARTS_WITHOUT_PROGRESS
# of them in a row the warning no longer requeues the job: a time limit too short for the start-up would
# otherwise requeue it for ever. Stops that trained something are never counted (submitit caps at 3 as well).
STARTS_FILE = "starts.jsonl"
MAX_STARTS_WITHOUT_PROGRESS = 3


def record_start(run_dir: Path) -> None:
    _append(run_dir, {"event": "start", "time": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm_job": slurm_job_id(),
                      "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)})


def _append(run_dir: Path, record: dict) -> None:
    with open_append(Path(run_dir) / STARTS_FILE) as f:
        f.write((json.dumps(record) + "\n").encode())


def read_starts(run_dir: Path) -> list[dict]:
    """The run directory's starts and stops, oldest first ([] without any; a line cut by a kill is left out)."""
    try:
        lines = (Path(run_dir) / STARTS_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [record for record in records if isinstance(record, dict)]


def stops_without_progress(run_dir: Path) -> int:
    """How many requested stops in a row, the newest last, trained no step. A start followed by another start
    ended without a stop record (a crash, kill -9, a node failure): it may have trained, so the count ends there."""
    count, later = 0, None
    for record in reversed(read_starts(run_dir)):
        event = record.get("event")
        if event == "stop":
            if record.get("trained_steps", 1) > 0:
                break
            count += 1
        elif event == "start" and later == "start":
            break
        later = event
    return count


def previous_stop(run_dir: Path) -> str:
    """The run's newest requested stop, in words (the Slurm scripts' header: why this start exists)."""
    records = read_starts(run_dir)
    if not records:
        return "none: the run's first start"
    last = records[-1]
    if last.get("event") != "stop":
        return "none recorded after the previous start (a crash, kill -9, a node failure or the time limit)"
    return (f"{last.get('signal')} at {last.get('where')} ({last.get('time')}), "
            f"{'requeued' if last.get('requeued') else 'not requeued'}")


class StoppedToResume(TrainingError):
    """A requested stop, after its checkpoint: one line saying where the run stopped and how it goes on, the
    signal's exit code, and, for Slurm's warning signal, the job to requeue once the process has finished its
    other business (W&B above all: a requeue sends SIGTERM to every process of the job, wandb's service among
    them, so it comes last)."""

    def __init__(self, message: str, signal_name: str | None, where: str, requeue_job: str | None):
        super().__init__(message)
        self.signal_name, self.where = signal_name, where
        self.exit_code = EXIT_CODES.get(signal_name, 1)
        self.requeue_job = requeue_job

    def settle(self, run_dir: Path, trained_steps: int, main_process: bool) -> None:
        """Requeue the Slurm job (if this process should, and unless too many starts in a row made no progress),
        add what happened to the message, and record the stop in the run directory (the main process)."""
        requeued = False
        if self.requeue_job:
            idle = stops_without_progress(run_dir) + 1 if trained_steps == 0 else 0
            if idle >= MAX_STARTS_WITHOUT_PROGRESS:
                outcome = (f"not requeued: the last {idle} starts of this run were stopped before they trained a "
                           f"step (the warning came during start-up); give the job more time (--time) or the "
                           f"warning earlier (--signal=B:USR1@<more seconds>) and submit it again")
            else:
                outcome = requeue_slurm_job(self.requeue_job)
                requeued = outcome.startswith("requeued")
            self.args = (f"{self.args[0]}; {outcome}",)
            self.requeue_job = None
        if main_process:
            _append(run_dir, {"event": "stop", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "signal": self.signal_name, "where": self.where, "trained_steps": trained_steps,
                              "requeued": requeued})


def leave_after_checkpoint(stop: StopRequest, accelerator, saved: Path | None, where: str) -> None:
    """After the checkpoint of a requested stop (every process calls this; saved is None when the stop came
    before the first step, with nothing new to save): raise StoppedToResume. Under Slurm, the warning signal
    (SIGUSR1 or SIGUSR2) asks the main process to requeue the job (StoppedToResume.settle, called by the
    training once W&B is finished)."""
    signal_name = stop.stop_signal
    message = f"stopped by {signal_name} at {where}; " + (f"saved {saved}" if saved else "nothing new to save")
    job, requeue_job = slurm_job_id(), None
    if signal_name in WARNINGS and job:
        requeue_job = job if accelerator.is_main_process else None
    elif job:  # SIGTERM from Slurm: scancel, preemption, a time limit, or its own requeue
        message += "; if Slurm requeues the job it resumes from here, else submit the same command again"
    else:
        message += "; run the same command again to resume"
    accelerator.wait_for_everyone()
    raise StoppedToResume(message, signal_name, where, requeue_job)
