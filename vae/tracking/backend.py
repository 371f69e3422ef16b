"""What a tracker backend offers vae.tracking.Tracker (Backend), and what the backends share: the step guard
(Steps), how long a run that leaves waits for a start still under way, paths as they are printed.

A backend is one tracker of log.trackers (W&B: wandb_backend.py; TensorBoard: tensorboard_backend.py). The Tracker
makes one of each registered backend for a training or an evaluation, starts those log.active_trackers names (on
the main process only), and calls them all alike; every method of a backend does nothing while it is off (not
asked for, failed, closed, or not the main process). The Tracker decides which steps are logged (Steps); a
backend's log calls get only those.
"""

from __future__ import annotations

from pathlib import Path

from ..console import RunConsole

# How long a run that is leaving (a stop, a failure) waits for W&B's start still under way: well inside Slurm's
# 30 s between SIGTERM and SIGKILL, and long enough for a start that was about to finish.
START_PATIENCE_S = 10.0
# evaluate.py's numbers that go into the history and the summary as eval/<key>
EVAL_KEYS = ("nelbo", "recon", "kl", "iwae_nll", "active_units", "iwae_k", "checkpoint_epoch", "n_images")


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class Steps:
    """The shared logging guard: which steps the backends log. Every backend gets the same rows and skips the
    same steps: those the run directory's W&B run or TensorBoard folder already holds, whichever is further."""

    def __init__(self):
        self.logged_before = -1  # highest step logged by earlier starts of this run: not logged again
        self.resumed_at = -1  # the step of the state this start resumed from (-1: a new start)
        self.last_step = -1

    def held(self, step: int) -> None:
        """A backend holds the steps up to `step` from earlier starts of this run."""
        self.logged_before = self.last_step = max(self.logged_before, step)

    def is_new(self, step: int, epoch_row: bool = False) -> bool:
        """Whether to log at `step`: steps an earlier start of this run already logged are skipped (they were
        trained again after a crash), so the history never goes backwards. An epoch's row (val/*, its figures) at
        the very step this start resumed from is new: the earlier start stopped after the epoch's last batch,
        before its test pass, having logged only that step's train/*."""
        return step > self.logged_before or (epoch_row and step == self.logged_before == self.resumed_at)

    def advance(self, step: int) -> bool:
        """A row was logged at `step`: whether it is the furthest so far."""
        if step <= self.last_step:
            return False
        self.last_step = step
        return True


class Backend:
    """One tracker of log.trackers, as the Tracker calls it. Subclasses set `name` (the one in log.trackers) and
    implement `on`, `start`, `log`, `interrupted` and `end`; the other calls do nothing unless overridden."""

    name = ""
    # Whether its calls can wait (a start in the background, a service): the Tracker calls such backends after the
    # others, and starts them before the others.
    may_wait = False

    def __init__(self, accelerator, console: RunConsole, steps: Steps):
        self.accelerator = accelerator
        self.console = console
        self.steps = steps  # the Tracker's, shared by every backend
        self.starting = None  # a start still under way (an object with a `done` Event), else None
        self.start_wait_s = 0.0  # how long the loop waited for that start

    @property
    def on(self) -> bool:
        """Whether it takes rows: starting or started, not closed."""
        raise NotImplementedError

    def start(self, log, run_name: str | None, run_dir: Path, config: dict | None, resumed: bool) -> None:
        """Start (or continue) this tracker's record of the run directory. Never raises: a tracker that cannot start
        warns and stays off. What it holds from earlier starts goes into Steps.held."""
        raise NotImplementedError

    def wait_started(self, give_up, patience_s: float | None) -> None:
        """Wait for a start under way (see Tracker.wait_for_wandb)."""

    def define_epoch_metrics(self) -> None:
        """Declare that epoch-level charts use `epoch` as their x-axis, where the tracker has such a thing."""

    def log(self, values: dict, step: int) -> None:
        """A row of numbers at the global step (one that Steps lets through)."""
        raise NotImplementedError

    def log_figures(self, figures: dict, latents, labels, epoch: int, step: int, prefix: str = "",
                    points: int = 0) -> bool:
        """figures: name.png -> matplotlib Figure, at `step`; latents [N, z] and labels [N] for trackers that show
        them. Whether a row went out."""
        return False

    def evaluation_extras(self, results: dict) -> dict:
        """What the tracker adds to the row of evaluate.py's numbers (W&B: the KL chart)."""
        return {}

    def log_evaluation(self, results: dict, figures: dict, latents, labels, step: int) -> bool:
        """evaluate.py's numbers as eval/* (a history row at `step`, after the run's last step, and the summary),
        its figures as eval/figures/*. Whether it logged."""
        if not self.on:
            return False
        scalars = {f"eval/{key}": results[key] for key in EVAL_KEYS if isinstance(results.get(key), (int, float))}
        self.log({**scalars, **self.evaluation_extras(results)}, step)
        if figures:
            self.log_figures(figures, latents, labels, results.get("checkpoint_epoch") or 0, step, prefix="eval/")
        self.summary({**scalars, "eval/kl_per_dim_values": results["kl_per_dim"],
                      "eval/checkpoint": results["checkpoint"]})
        return True

    def log_model_file(self, path: Path, *, epoch: int, best: bool, metrics: dict) -> None:
        """A model file written after an epoch, for trackers that keep files."""

    def summary(self, values: dict) -> None:
        """The run's final numbers, for trackers that keep a summary."""

    def step_advanced(self) -> None:
        """Steps.last_step has moved on."""

    def save_step(self) -> None:
        """Remember the last logged step in the run directory, for trackers that cannot read it back."""

    def interrupted(self, preempted: bool, exit_code: int) -> None:
        """Training is leaving early (an exception; preempted: by a signal, to be resumed): close."""
        raise NotImplementedError

    def end(self) -> None:
        """Training (or the evaluation) is over: close."""
        raise NotImplementedError
