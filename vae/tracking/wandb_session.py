"""The life of the run directory's W&B run on the main process, under the W&B backend (wandb_backend.py): its
id and wandb_run.json made or read back, its start in the background (wandb_start.py) waited for, taken over or
abandoned, what is logged meanwhile queued, a failure turned into one warning, and the steps logged written
down. What is logged into the run, and how it is closed: wandb_backend.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..console import RunConsole
from ..errors import first_line
from .backend import Backend, Steps
from .wandb_files import (
    RUN_FILE,
    keep_wandb_files_in,
    new_run_id,
    read_run_file,
    redirects_console,
    sweep_run_id,
    sync_command,
    write_run_file,
)
from .wandb_start import WandbStart, start_wandb_run

STEP_FILE_EVERY_S = 30.0  # how often the last logged step is written to RUN_FILE while training


class WandbSession(Backend):
    """The W&B run of a training or evaluation, from its start to its failure, if any."""

    name = "wandb"
    may_wait = True

    def __init__(self, accelerator, console: RunConsole, steps: Steps):
        super().__init__(accelerator, console, steps)
        self.run = None  # the wandb Run while W&B works, on the main process
        self.dropped_run = None  # the wandb Run a failure made the harness stop logging to, still to be closed
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.offline = False
        self._step_written_at = 0.0
        self.starting: WandbStart | None = None  # W&B's start while it is under way
        self._queued: list[tuple[str, Any]] = []  # (what, action) for W&B meanwhile, in order

    @property
    def on(self) -> bool:
        return self.run is not None or self.starting is not None

    # -- start ---------------------------------------------------------------------------------------------

    def start(self, log, run_name: str | None, run_dir: Path, config: dict | None, resumed: bool) -> None:
        """The run id and wandb_run.json here; wandb.init in the background (WandbStart)."""
        if "wandb" not in [str(t) for t in getattr(self.accelerator, "log_with", [])]:
            self.console.warn("log.wandb=true but wandb is not installed (or the Accelerator was made without "
                              "log_with='wandb'): going on without W&B; pip install wandb, or pass log.wandb=false")
            return
        try:
            project, init = self._prepare(log, run_name, run_dir, resumed)
            import wandb  # noqa: F401  on the main thread, before the progress bar: see vae.tracking.wandb_start
        except Exception as e:  # a bug or an unexpected wandb: W&B is optional, training is not
            self._fail("W&B could not start", e)
            return
        job = WandbStart(lambda started: start_wandb_run(started, project, config, init))
        self.starting = job.start(in_thread=not redirects_console())

    def _prepare(self, log, run_name, run_dir: Path, resumed: bool) -> tuple[str, dict]:
        """On the main thread, before W&B's start: the run id and the steps logged before (which the loop needs
        at once), wandb_run.json, and wandb.init's arguments other than its mode and settings."""
        record = read_run_file(run_dir) if resumed else None
        if resumed and record is None:
            self.console.info(f"no W&B run recorded in {run_dir} ({RUN_FILE}): starting a new W&B run")
        self.run_dir = run_dir
        self.run_id = record["id"] if record else sweep_run_id() or new_run_id()
        self.steps.held(int(record.get("last_step", -1)) if record else -1)
        project, entity = self._where_it_was(record, log) if record else (log.project, log.entity)
        write_run_file(run_dir, {"id": self.run_id, "project": project, "entity": entity,
                                 "last_step": self.steps.last_step})
        # Here, on the main thread. (wandb's service start, in the thread, sets WANDB_SERVICE in os.environ: the
        # one change of the environment made beside the training, once, at its first seconds.)
        keep_wandb_files_in(run_dir)
        return project, {"name": log.name or run_name, "entity": entity, "group": log.group,
                         "tags": list(log.tags) or None, "dir": str(run_dir), "id": self.run_id, "resume": "allow"}

    def _where_it_was(self, record: dict, log) -> tuple[str, str | None]:
        """The project and entity a resumed run keeps logging to: those its W&B run was made in (a changed
        log.project would split its history over two runs)."""
        project = record.get("project") or log.project
        entity = record.get("entity") if "entity" in record else log.entity
        for key, was, now in (("project", project, log.project), ("entity", entity, log.entity)):
            if now != was:
                self.console.warn(f"log.{key}={now} ignored: this run directory's W&B run {record['id']} is in "
                                  f"{key} {was} ({RUN_FILE}); to log elsewhere, train into a new run.dir or "
                                  f"with train.resume=false")
        return project, entity

    # -- the start under way -------------------------------------------------------------------------------

    def wait_started(self, give_up, patience_s: float | None) -> None:
        """Wait for W&B's start, if it is under way, and take its run over (what was queued meanwhile is logged),
        unless give_up() or patience_s seconds end the wait first: a start waited for in vain is abandoned."""
        if self.starting is None:
            return
        waited = time.monotonic()
        over = self.starting.wait(give_up, patience_s)
        self.start_wait_s += time.monotonic() - waited
        if over:
            self._take_over()
        else:
            self._abandon_start("a stop was asked for" if patience_s is None else f"not ready after {patience_s:g} s")

    def _abandon_start(self, why: str) -> None:
        """W&B off for this start, its thread left to finish or hang alone (a daemon): what was queued is dropped
        (metrics.jsonl has it); a resume logs into the same W&B run."""
        self.starting, self._queued = None, []
        self.console.warn(f"W&B was still starting when {why}: going on without W&B for this start")

    def _still_starting(self) -> bool:
        """Whether W&B's start is under way (never waits); a start found over is taken over here."""
        if self.starting is not None and self.starting.done.is_set():
            self._take_over()
        return self.starting is not None

    def _take_over(self) -> None:
        """On the main thread, once the start is over: its messages, the run registered on the Accelerator after
        TensorBoard, the address or sync command, then what was queued meanwhile, in order. A failed start is
        the one warning of a start failing as before, the queue dropped with W&B."""
        job, self.starting = self.starting, None
        queued, self._queued = self._queued, []
        try:
            for message in job.messages:
                self.console.warn(message)
            if job.failure is not None:
                self._fail(*job.failure)
                return
            self.run, self.offline = job.tracker.run, job.offline
            self.accelerator.trackers.append(job.tracker)
            self._announce(job.why_offline)
        except Exception as e:  # W&B is optional, training is not
            self._fail("W&B could not start", e)
            return
        for what, action in queued:
            self._guard(what, action)

    def _to_wandb(self, what: str, action) -> None:
        """action() on the W&B run now, or queued while W&B is starting."""
        if self._still_starting():
            self._queued.append((what, action))
        else:
            self._guard(what, action)

    def _announce(self, why_offline: str | None) -> None:
        if self.run is None:
            return
        if getattr(self.run.settings, "_noop", False):
            self.console.info("W&B disabled (WANDB_MODE=disabled)")
            return
        if self.offline:
            self.console.info(f"W&B run {self.run_id} is logged offline ({why_offline or 'offline mode'}); upload "
                              f"it later with: {sync_command(self.run_dir, self.run_id, self.run)}")
        else:
            self.console.info(f"W&B run {self.run_id}: {self.run.url}")

    # -- failures ------------------------------------------------------------------------------------------

    def _drop_accelerate_trackers(self) -> None:
        self.accelerator.trackers = [t for t in self.accelerator.trackers if getattr(t, "name", None) != "wandb"]

    def _fail(self, what: str, error: BaseException) -> None:
        """Warn once and go on without W&B."""
        if self.run is not None or what.startswith("W&B could not start"):
            self.console.warn(f"{what} ({first_line(error)}); going on without W&B (metrics.jsonl and the "
                              f"figures are written as usual)")
        self.dropped_run = self.run or self.dropped_run
        self.run = None
        self._drop_accelerate_trackers()

    def _guard(self, what: str, action) -> Any:
        if self.run is None:
            return None
        try:
            return action()
        except Exception as e:
            self._fail(f"W&B failed while {what}", e)
            return None

    # -- the steps logged ----------------------------------------------------------------------------------

    def step_advanced(self) -> None:
        """At least every STEP_FILE_EVERY_S while the run logs, the last logged step goes into wandb_run.json."""
        if self.run is not None and time.monotonic() - self._step_written_at > STEP_FILE_EVERY_S:
            self.save_step()

    def save_step(self) -> None:
        """Remember the last logged step in the run directory (read back when the run resumes)."""
        if self.run_dir is None or self.run_id is None:
            return
        record = read_run_file(self.run_dir) or {"id": self.run_id}
        if record.get("id") == self.run_id:
            record["last_step"] = self.steps.last_step
            try:
                write_run_file(self.run_dir, record)
            except OSError:
                pass
        self._step_written_at = time.monotonic()
