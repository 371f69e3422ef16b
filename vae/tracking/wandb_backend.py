"""Weights & Biases (log.trackers=[wandb]) through Accelerate's WandBTracker: WandbBackend, what vae.tracking.Tracker
calls, is what is logged into the run and how the run is closed; the run's start, queue and failures are
wandb_session.py's, its background start wandb_start.py's, its files and settings wandb_files.py's. The wandb_*
modules are the only ones that know wandb, and they import it only inside functions: `import vae.training.loop` and
runs without W&B never load it.

- One W&B run per run directory, across restarts: its id is kept in <run dir>/wandb_run.json, made on the first
  start and reused (`resume="allow"`) whenever training resumes from a checkpoint there, so a requeued Slurm job
  continues the same run. W&B's files go to <run dir>/wandb/.
- Offline first: with WANDB_MODE=offline, or with no credentials found (WANDB_API_KEY, ~/.netrc from `wandb
  login`, wandb's settings; looked up without network and without prompting), the run is written offline and
  the exact `wandb sync` command is printed once. wandb cannot resume offline runs: each restart writes another
  offline-run-*-<id> folder with the same id; `wandb sync --id <id> <folders>` uploads them oldest first into one
  run. Steps never go backwards across the folders: steps an earlier start already logged are not logged again
  (the last logged step is kept in wandb_run.json, at least every STEP_FILE_EVERY_S: after a kill -9 the steps of
  those last seconds can be logged twice; W&B online keeps the first).
- Never fatal: if W&B fails (wandb.init raising, or a log call raising mid-run), a warning is printed once and
  training goes on without W&B; metrics.jsonl and the PNG files never depend on it.
- Only the main process talks to W&B; on the others every method does nothing.
- Started in the background (wandb_start.py): rows logged meanwhile are queued and reach W&B in order.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import first_line
from .backend import START_PATIENCE_S
from .wandb_files import FLUSH_EVERY_S, read_run_file, stop_wandb_service
from .wandb_session import WandbSession


def figure_to_image(fig, caption: str | None = None):
    """A matplotlib Figure as a wandb.Image (rendered to PNG here, so wandb never touches pyplot)."""
    import wandb
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return wandb.Image(Image.open(buffer), caption=caption)


def figure_row(figures: dict, latents, labels, epoch: int, prefix: str, points: int) -> dict:
    """The figures as images, and the latent table with its scatter plot (see WandbBackend.log_figures)."""
    import wandb

    from ..figures.plots import project_2d

    values: dict[str, Any] = {f"{prefix}figures/{name.removesuffix('.png')}": figure_to_image(fig)
                              for name, fig in figures.items()}
    shown = slice(0, points or len(latents))
    xy, xlabel, ylabel = project_2d(latents[shown])
    x, y = ("z0", "z1") if latents.shape[1] <= 2 else ("pc1", "pc2")
    rows = [[a, b, int(c)] for (a, b), c in zip(xy.tolist(), labels[shown].cpu().tolist(), strict=True)]
    table = wandb.Table(columns=[x, y, "digit"], data=rows)
    values[f"{prefix}latent/means"] = wandb.plot.scatter(
        table, x, y, title=f"Test set latent means, epoch {epoch} ({xlabel} vs {ylabel})")
    if not prefix:
        values["epoch"] = epoch
    return values


def kl_chart(kl_per_dim) -> dict:
    """The KL of each latent dimension as a bar chart (evaluate.py's eval/kl_per_dim)."""
    import wandb

    table = wandb.Table(columns=["dimension", "kl"], data=[[i, v] for i, v in enumerate(kl_per_dim)])
    return {"eval/kl_per_dim": wandb.plot.bar(table, "dimension", "kl", title="KL per latent dimension "
                                              "(nats per image); near 0: an inactive unit")}


class WandbBackend(WandbSession):
    """What the harness logs into its W&B run, and how the run is closed."""

    # -- logging -------------------------------------------------------------------------------------------

    def log(self, values: dict, step: int) -> None:
        """A row at the global step; while W&B is starting (not among the Accelerator's trackers yet), queued."""
        at = self._wandb_step(step)
        if self._still_starting():
            row = dict(values)
            self._queued.append(("logging", lambda: self.accelerator.get_tracker("wandb").log(row, step=at)))
        elif self.run is not None:
            self._guard("logging", lambda: self.accelerator.get_tracker("wandb").log(values, step=at))

    def _wandb_step(self, step: int) -> int:
        """A resumed W&B run goes on from the step after the last it holds and drops rows at earlier steps: an
        epoch's row at the step this start resumed from (Steps.is_new) goes one step later, where nothing else is
        (its charts are against `epoch`, define_epoch_metrics)."""
        return step + 1 if step == self.steps.logged_before else step

    def define_epoch_metrics(self) -> None:
        """Epoch-level charts (val/*, the epoch's train loss, perf/*, figures) use `epoch` as their x-axis."""
        def define():
            self.run.define_metric("epoch")
            for pattern in ("val/*", "val_ema/*", "train/epoch_loss", "perf/*", "figures/*", "latent/*"):
                self.run.define_metric(pattern, step_metric="epoch")
            # the run's summary keeps the best (lowest) test loss, not the last; the final table says both
            self.run.define_metric("val/loss", step_metric="epoch", summary="min")
        self._to_wandb("defining metrics", define)

    def log_figures(self, figures: dict, latents, labels, epoch: int, step: int, prefix: str = "",
                    points: int = 0) -> bool:
        """The figures as images; of latents [N, z] with labels [N], an interactive table (the latents, or their
        2-D PCA projection when z > 2) and its scatter plot, of the first `points` images (0: all)."""
        if self.run is None:
            return False
        values = self._guard("preparing the figures",
                             lambda: figure_row(figures, latents, labels, epoch, prefix, points))
        if not values:
            return False
        at = self._wandb_step(step)
        self._guard("logging", lambda: self.accelerator.get_tracker("wandb").log(values, step=at))
        return True

    def evaluation_extras(self, results: dict) -> dict:
        """evaluate.py's row also has the KL of each latent dimension, as a bar chart."""
        return self._guard("preparing the KL chart", lambda: kl_chart(results["kl_per_dim"])) or {}

    def log_model_file(self, path: Path, *, epoch: int, best: bool, metrics: dict) -> None:
        """One artifact version per epoch: aliases latest, epoch-N, and best when it is the best so far."""
        if self.run is None:
            return

        def upload():
            import wandb

            artifact = wandb.Artifact(f"model-{self.run_id}", type="model",
                                      metadata={"epoch": epoch, **metrics})
            artifact.add_file(str(path), name="model.pt")
            config = path.parent / "config.yaml"  # the run's resolved config: what the model was trained with
            if config.is_file():
                artifact.add_file(str(config), name="config.yaml")
            aliases = ["latest", f"epoch-{epoch}"] + (["best"] if best else [])
            self.run.log_artifact(artifact, aliases=aliases)

        self._guard("uploading the model file", upload)

    def summary(self, values: dict) -> None:
        if self.run is None:
            return
        self._guard("writing the summary", lambda: self.run.summary.update(values))

    # -- closing -------------------------------------------------------------------------------------------

    def interrupted(self, preempted: bool, exit_code: int) -> None:
        """Training is leaving early (an exception): finish the W&B run with the process's exit code.
        preempted: stopped by a signal to be resumed (Slurm preemption, time limit), which W&B then shows as
        preempted rather than failed. A run W&B failed on earlier is closed too: when a job-wide SIGTERM (scancel)
        kills wandb's service, the next log call often fails before the harness sees its own SIGTERM. A start
        still under way is waited for a few seconds (START_PATIENCE_S): what was queued meanwhile reaches W&B
        before it is finished."""
        self.wait_started(lambda: False, START_PATIENCE_S)
        run = self.run or self.dropped_run
        if run is None:
            return
        self.save_step()
        try:
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as error:
            self._close_without_the_service(preempted, exit_code, error)
        self.run = self.dropped_run = None
        self._drop_accelerate_trackers()
        stop_wandb_service()

    def _close_without_the_service(self, preempted: bool, exit_code: int, error: Exception) -> None:
        """wandb's service died before the run was finished: scancel and Slurm's other SIGTERMs reach every process
        of the job, the service too (wandb #9963). What it had not written yet is lost (at most the last
        FLUSH_EVERY_S seconds); a new start of the same W&B run, in a folder of its own, records how the run
        ended, so that it shows as preempted (or failed), not crashed."""
        import wandb

        stop_wandb_service()
        record = read_run_file(self.run_dir) or {}
        try:
            run = wandb.init(id=self.run_id, resume="allow", dir=str(self.run_dir), project=record.get("project"),
                             entity=record.get("entity"), mode="offline" if self.offline else None,
                             settings=wandb.Settings(silent=True))
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as again:
            self._fail("W&B failed while finishing the run", again)
            return
        self.console.warn(f"W&B's service stopped before the run was finished ({first_line(error)}; scancel and "
                          f"Slurm's other SIGTERMs reach it too): the run is closed as "
                          f"{'preempted' if preempted else 'failed'} in a new segment; what it logged in its last "
                          f"{FLUSH_EVERY_S:.0f} s may be missing")

    def end(self) -> None:
        """Finish the W&B run (what Accelerate's WandBTracker.finish does), a failure there turned into a warning; a
        run W&B failed on earlier is closed too, and wandb's service stopped here (see stop_wandb_service)."""
        if self.run is not None:
            self.save_step()
            self._guard("finishing the run", self.run.finish)
            self._drop_accelerate_trackers()
        self.run = None
        if self.dropped_run is not None:
            try:
                self.dropped_run.finish()
            except Exception:
                pass
            self.dropped_run = None
            stop_wandb_service()
