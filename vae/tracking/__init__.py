"""The trackers of log.trackers, as the training loop and evaluate.py use them: a Tracker, which calls one backend
object per tracker through Accelerate's tracker API (Weights & Biases: wandb_backend.py; TensorBoard:
tensorboard_backend.py; their common interface: backend.py).

Every backend gets the same rows (scalars at the global step) and skips the same steps: those the run directory's
W&B run or TensorBoard folder already holds, whichever is further (backend.Steps). Nothing here imports wandb.

Adding a tracker (MLflow, CSV): a file with its Backend subclass, and its class in BACKENDS (imported here).
"""

from __future__ import annotations

from pathlib import Path

from ..console import RunConsole
from .backend import START_PATIENCE_S, Backend, Steps
from .tensorboard_backend import TensorBoardBackend
from .wandb_backend import WandbBackend
from .wandb_files import RUN_FILE, has_credentials, read_run_file

__all__ = ["BACKENDS", "RUN_FILE", "Tracker", "has_credentials", "log_with", "read_run_file"]

# The backends, each under its name in log.trackers.
BACKENDS: tuple[type[Backend], ...] = (WandbBackend, TensorBoardBackend)


def log_with(enabled: bool) -> str | None:
    """The `log_with` argument for Accelerator: "wandb", or None (then nothing imports wandb)."""
    return "wandb" if enabled else None


class _Through:
    """An attribute of the Tracker kept in one of its parts, read and set through it: in `steps` (the step guard)
    or in a backend, by name. Callers and tests read tracker.last_step, tracker.run, tracker.tensorboard, ..."""

    def __init__(self, part: str, name: str | None = None):
        self.part, self.name = part, name

    def __set_name__(self, owner, name: str) -> None:
        self.name = self.name or name

    def __get__(self, tracker, owner=None):
        return self if tracker is None else getattr(tracker._part(self.part), self.name)

    def __set__(self, tracker, value) -> None:
        setattr(tracker._part(self.part), self.name, value)


class Tracker:
    """The trackers of a training or evaluation. `Tracker.start(...)` never raises; every method is a no-op when
    they are off, failed, or this is not the main process."""

    logged_before = _Through("steps")  # highest step logged by earlier starts of this run: not logged again
    resumed_at = _Through("steps")  # the step of the state this start resumed from (-1: a new start)
    last_step = _Through("steps")
    run = _Through("wandb")  # the wandb Run while W&B works, on the main process
    run_dir = _Through("wandb")
    run_id = _Through("wandb")
    offline = _Through("wandb")
    tensorboard = _Through("tensorboard", "tracker")  # its RunTensorBoard while TensorBoard is on

    def __init__(self, accelerator, console: RunConsole):
        self.accelerator = accelerator
        self.console = console
        self.steps = Steps()
        # Backends whose calls may wait (W&B: its start in the background, its service) come after the others:
        # TensorBoard gets each row, and a stop closes its event file, before W&B can hold anything up or fail.
        self.backends: list[Backend] = sorted((backend(accelerator, console, self.steps) for backend in BACKENDS),
                                              key=lambda b: b.may_wait)
        self.stop_requested = lambda: False  # whether a stop was asked for: the loop's StopRequest.requested

    def _part(self, name: str):
        """The step guard ("steps"), or the backend of that name."""
        return self.steps if name == "steps" else next(b for b in self.backends if b.name == name)

    @property
    def active(self) -> bool:
        """Whether W&B's run is on."""
        return self.run is not None

    @property
    def starting(self):
        """A backend's start still under way (W&B's WandbStart), or None."""
        return next((b.starting for b in self.backends if b.starting is not None), None)

    @property
    def start_wait_s(self) -> float:
        """How long the loop waited for W&B's start."""
        return sum(b.start_wait_s for b in self.backends)

    # -- start ---------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, accelerator, console: RunConsole, *, log, run_name: str | None, run_dir: Path,
              config: dict | None, resumed: bool, resumed_at: int = -1, stop_requested=None) -> Tracker:
        """Start (or continue) the run directory's W&B run and TensorBoard folder, as log.active_trackers says.
        `log` is the LogConfig; `resumed`: whether this continues the run directory's training (then its W&B run
        id is reused, else a new one is made), from the state of step `resumed_at`. Returns while W&B is still
        starting, in the background (WandbStart): backends that start in the background start first, so that
        their start overlaps the others' and the training."""
        tracker = cls(accelerator, console)
        tracker.resumed_at = resumed_at if resumed else -1
        tracker.stop_requested = stop_requested or tracker.stop_requested
        if not accelerator.is_main_process:
            return tracker
        for backend in sorted(tracker.backends, key=lambda b: not b.may_wait):
            if backend.name in log.active_trackers:
                backend.start(log, run_name, Path(run_dir), config, resumed)
        return tracker

    def wait_for_wandb(self, patience_s: float | None = None) -> None:
        """Wait for W&B's start, if it is under way, and take its run over (what was queued meanwhile is logged).
        Without patience_s the wait ends early only when a stop is asked for (a signal, Ctrl-C: the checkpoint
        comes first); with it, after that many seconds. A start waited for in vain is abandoned."""
        give_up = self.stop_requested if patience_s is None else (lambda: False)
        for backend in self.backends:
            backend.wait_started(give_up, patience_s)

    def settle_start(self) -> None:
        """On the way out, whatever the path: a start still under way gets a few seconds, then is abandoned."""
        if self.starting is not None:
            self.wait_for_wandb(patience_s=START_PATIENCE_S)

    # -- logging -------------------------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        """Whether a tracker (W&B, starting or started, TensorBoard) is on."""
        return any(backend.on for backend in self.backends)

    def is_new(self, step: int, epoch_row: bool = False) -> bool:
        """Whether to log at `step` (see Steps.is_new)."""
        return self.steps.is_new(step, epoch_row)

    def log(self, values: dict, step: int, epoch_row: bool = False) -> None:
        """A row at the global step, to every tracker, if it is new (is_new). While W&B is starting, its row is
        queued; an epoch's row waits for the start: the queue never outlasts the first epoch."""
        if not self.logging or not self.is_new(step, epoch_row):
            return
        if epoch_row:
            self.wait_for_wandb()
        for backend in self.backends:
            backend.log(values, step)
        self._logged(step)

    def _logged(self, step: int) -> None:
        if self.steps.advance(step):
            for backend in self.backends:
                backend.step_advanced()

    def define_epoch_metrics(self) -> None:
        """Epoch-level charts (val/*, the epoch's train loss, perf/*, figures) use `epoch` as their x-axis."""
        for backend in self.backends:
            backend.define_epoch_metrics()

    def figures_due(self, every: int, epoch: int, last: bool) -> bool:
        """Whether to draw and log the figures after this epoch: every `every` epochs and after the last one
        (train.epochs, or the one an early stop ends the run at)."""
        return self.logging and every > 0 and (epoch % every == 0 or last)

    def log_figures(self, figures: dict, latents, labels, epoch: int, step: int, prefix: str = "",
                    points: int = 0) -> None:
        """figures: name.png -> matplotlib Figure (vae.figures.model_figures), as images to every tracker; to W&B
        also, of latents [N, z] with labels [N], an interactive table (the latents, or their 2-D PCA projection
        when z > 2) and its scatter plot, of the first `points` images (0: all)."""
        if not self.is_new(step, epoch_row=True):
            return
        self.wait_for_wandb()
        for backend in self.backends:
            if backend.log_figures(figures, latents, labels, epoch, step, prefix, points):
                self._logged(step)

    def log_evaluation(self, results: dict, figures: dict, latents, labels) -> None:
        """evaluate.py's numbers as eval/* (history row after the run's last step, and summary), its figures
        as eval/figures/*, the latent table as eval/latent/means, and the KL of each latent dimension."""
        self.wait_for_wandb()
        step = self.last_step + 1
        for backend in self.backends:
            if backend.log_evaluation(results, figures, latents, labels, step):
                self._logged(step)

    def log_model_file(self, path: Path, *, epoch: int, best: bool, metrics: dict) -> None:
        """One artifact version per epoch: aliases latest, epoch-N, and best when it is the best so far."""
        self.wait_for_wandb()
        for backend in self.backends:
            backend.log_model_file(path, epoch=epoch, best=best, metrics=metrics)

    def summary(self, values: dict) -> None:
        self.wait_for_wandb()
        for backend in self.backends:
            backend.summary(values)

    def save_step(self) -> None:
        """Remember the last logged step in the run directory (read back when the run resumes)."""
        for backend in self.backends:
            backend.save_step()

    # -- the end -------------------------------------------------------------------------------------------

    def interrupted(self, preempted: bool, exit_code: int) -> None:
        """Training is leaving early (an exception): every tracker closed, W&B's run finished with the process's
        exit code (preempted: stopped by a signal to be resumed). TensorBoard's event file is closed first:
        complete, whatever W&B does (it waits a few seconds for a start still under way)."""
        for backend in self.backends:
            backend.interrupted(preempted, exit_code)

    def end_training(self) -> None:
        """accelerator.end_training() on every process (destroys the process group), once every tracker is closed
        (finishes the W&B run, closes TensorBoard's event file), with a W&B failure at the end turned into a
        warning. TensorBoard is closed before W&B is finished (after a start still under way, and what it
        queued)."""
        self.wait_for_wandb()
        for backend in self.backends:
            backend.end()
        self.accelerator.end_training()
