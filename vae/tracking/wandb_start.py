"""W&B's start, in a thread of its own (WandbStart, start_wandb_run), for the W&B backend (wandb_session.py).

wandb's service and wandb.init take seconds, which a thread of their own spends while the first epoch trains;
wandb is imported before, on the main thread (its import patches sys.stdout for its console capture, which must
be the real one, not the progress bar's stand-in). What is logged meanwhile waits in a queue and reaches W&B in
order, at its own steps, once the run is there; the loop waits for the start at the latest at the end of an epoch,
before figures, artifacts or the summary, and when training stops or ends. A stop asked for while it waits (a
signal, Ctrl-C) abandons the start: the checkpoint comes first. The main thread alone touches the Accelerator's
trackers and prints: the thread writes only into its WandbStart.
"""

from __future__ import annotations

import os
import threading
import time

from ..errors import first_line
from .wandb_files import configured_mode, has_credentials, run_settings


class WandbStart:
    """wandb's import, its mode, wandb.init and its fall-back to offline (start_wandb_run), in a daemon thread
    while training goes on. The thread writes only here: the W&B backend takes the result over on the main thread
    (WandbSession._take_over), which alone touches the Accelerator's trackers and the console. Daemon: a process
    that leaves without waiting for it (a crash) is not held up by a hanging online start."""

    def __init__(self, begin):
        self.begin = begin  # begin(self): the work, which fills in the fields below
        self.done = threading.Event()
        self.tracker = None  # Accelerate's WandBTracker, started
        self.offline = False
        self.why_offline: str | None = None
        self.messages: list[str] = []  # warnings to print when the run is taken over
        self.failure: tuple[str, BaseException] | None = None  # what failed, and why: W&B stays off

    def start(self, in_thread: bool = True) -> WandbStart:
        if in_thread:
            threading.Thread(target=self._run, args=(BaseException,), name="wandb-start", daemon=True).start()
        else:
            self._run(Exception)  # on the main thread a Ctrl-C during the start interrupts, as anywhere else
        return self

    def _run(self, caught: type[BaseException]) -> None:
        try:
            self.begin(self)
        except caught as error:  # in the thread anything, even SystemExit: there it would only be printed
            self.failure = self.failure or ("W&B could not start", error)
        finally:
            self.done.set()

    def wait(self, give_up=lambda: False, patience_s: float | None = None) -> bool:
        """Until the start is over (True), or until give_up() or patience_s seconds (False). The wait lets signal
        handlers run: a signal's stop request is seen within 0.2 s, a second Ctrl-C interrupts it."""
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while not self.done.wait(timeout=0.2):
            if give_up() or (deadline is not None and time.monotonic() >= deadline):
                return False
        return True


def started_tracker(project: str, config: dict | None, init: dict):
    """Accelerate's W&B tracker, made and started as accelerator.init_trackers makes and starts it, but not
    registered on the Accelerator: its thread leaves accelerator.trackers to the main thread, whose calls read and
    change them meanwhile, and init_trackers would start TensorBoard's tracker a second time."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    tracker = LOGGER_TYPE_TO_CLASS["wandb"](project, **{k: v for k, v in init.items() if v is not None})
    if hasattr(tracker, "start"):  # accelerate >= 1.8 defers wandb.init to start(); before, __init__ called it
        tracker.start()
    if config is not None:
        tracker.store_init_configuration(config)
    run = getattr(tracker, "run", None)
    if run is None or not hasattr(run, "log"):
        raise RuntimeError("wandb.init returned no run")
    return tracker


def start_wandb_run(job: WandbStart, project: str, config: dict | None, init: dict) -> None:
    """In the start's thread: online, offline or disabled (decided without network, never prompting), then
    wandb.init; where an online start fails (no network on a compute node, server down), offline instead."""
    import wandb

    configured = configured_mode()
    mode, why_offline = None, None
    if configured is None and not has_credentials():
        mode, why_offline = "offline", "no credentials found: `wandb login` or WANDB_API_KEY"
    elif configured == "offline":
        why_offline = "offline mode"
    silence = not any(os.environ.get(v) for v in ("WANDB_SILENT", "WANDB_QUIET"))
    # wandb's own banner and footer would interleave with the harness's output: the harness prints the run's
    # address (or sync command) itself. wandb's warnings still show.
    init = {**init, "settings": run_settings(silent=silence), **({"mode": mode} if mode else {})}
    try:
        job.tracker = started_tracker(project, config, init)
    except Exception as e:
        if mode == "offline" or configured is not None:
            job.failure = ("W&B could not start", e)
            return
        job.messages.append(f"W&B could not start online ({first_line(e)}); logging offline instead")
        init["mode"], why_offline = "offline", "the online start failed"
        try:
            wandb.teardown()  # the failed attempt still holds the run id in wandb's service
        except Exception:
            pass
        try:
            job.tracker = started_tracker(project, config, init)
        except Exception as e2:
            job.failure = ("W&B could not start offline either", e2)
            return
    job.offline = bool(getattr(job.tracker.run.settings, "_offline", False)) or init.get("mode") == "offline"
    job.why_offline = why_offline
