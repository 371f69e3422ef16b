"""The trackers of log.trackers through Accelerate's tracker API: Weights & Biases here, TensorBoard in
vae.tensorboard_tracking. The only module that knows wandb, and it imports it only inside functions: `import
vae.training` and runs without W&B never load it. The W&B side:

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
- Started in the background: wandb's service and wandb.init take seconds, which a thread of their own spends
  while the first epoch trains (WandbStart); wandb is imported before, on the main thread (its import patches
  sys.stdout for its console capture, which must be the real one, not the progress bar's stand-in). What is
  logged meanwhile waits in a queue and reaches W&B in order, at its own steps, once the run is there; the loop
  waits for the start at the latest at the end of an epoch, before figures, artifacts or the summary, and when
  training stops or ends. A stop asked for while it waits (a signal, Ctrl-C) abandons the start: the checkpoint
  comes first. The main thread alone touches the Accelerator's trackers and prints.

Both trackers get the same accelerator.log calls (scalars at the global step) and skip the same steps: those the
run directory's W&B run or TensorBoard folder already holds, whichever is further.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import string
import threading
import time
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .console import RunConsole
from .errors import first_line
from .tensorboard_tracking import RunTensorBoard

RUN_FILE = "wandb_run.json"
STEP_FILE_EVERY_S = 30.0  # how often the last logged step is written to RUN_FILE while training
FLUSH_EVERY_S = 2.0  # how often wandb writes what was logged to the run's offline file (see _settings)
# How long a run that is leaving (a stop, a failure) waits for W&B's start still under way: well inside Slurm's
# 30 s between SIGTERM and SIGKILL, and long enough for a start that was about to finish.
START_PATIENCE_S = 10.0
ID_ALPHABET = string.ascii_lowercase + string.digits


def log_with(enabled: bool) -> str | None:
    """The `log_with` argument for Accelerator: "wandb", or None (then nothing imports wandb)."""
    return "wandb" if enabled else None


# ---------------------------------------------------------------------------------------------------------
# The run directory's record of its W&B run


def read_run_file(run_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not data["id"]:
        return None
    return data


def _write_run_file(run_dir: Path, data: dict) -> None:
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(data, indent=1) + "\n")


def new_run_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(8))


def sweep_run_id() -> str | None:
    """Under `wandb agent` (a W&B sweep): the run id the agent was given for this run, which the sweep waits for."""
    return os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None


# ---------------------------------------------------------------------------------------------------------
# Which mode: online, offline, disabled (decided without network, never prompting)


def _keep_wandb_files_in(run_dir: Path) -> None:
    """Besides the run folders (wandb.init's dir), wandb writes into the home directory: a staging folder for what
    it logs as artifacts (the model files, each logged Table), which an offline run's `wandb sync` reads later
    (WANDB_DATA_DIR), and its service's logs and artifact cache (WANDB_CACHE_DIR). Keep both in the run's wandb/
    folder, unless the user set them, so that the run directory holds everything the run wrote and sync needs.
    Called before wandb's settings are first read, which would otherwise warn about a changed environment."""
    wandb_dir = (Path(run_dir) / "wandb").resolve()
    for variable, folder in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        current, ours = os.environ.get(variable), f"VAE_SET_{variable}"  # what this process set before
        if current is None or current == os.environ.get(ours):
            os.environ[variable] = os.environ[ours] = str(wandb_dir / folder)


def _wandb_settings():
    from wandb.sdk import wandb_setup

    return wandb_setup.singleton().settings


def _configured_mode() -> str | None:
    """The mode the user chose, "offline" or "disabled" (WANDB_MODE, `wandb offline`); None: online."""
    try:
        settings = _wandb_settings()
        if settings._noop:
            return "disabled"
        if settings._offline:
            return "offline"
        return None
    except Exception:  # another wandb version: read the environment variable ourselves
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        return {"offline": "offline", "dryrun": "offline", "disabled": "disabled"}.get(mode)


def has_credentials() -> bool:
    """Whether wandb.init would find credentials without asking: WANDB_API_KEY (or an identity token file),
    ~/.netrc (where `wandb login` stores the key) or wandb's settings. Never prompts, never uses the network."""
    try:
        from wandb.sdk.lib import wbauth

        settings = _wandb_settings()
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        return wbauth.authenticate_session(host=host, source="vae", prompt=False, update_session=False) is not None
    except Exception:  # another wandb version, or a key in an invalid format: look by hand
        pass
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ---------------------------------------------------------------------------------------------------------
# The tracker


def _shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def figure_to_image(fig, caption: str | None = None):
    """A matplotlib Figure as a wandb.Image (rendered to PNG here, so wandb never touches pyplot)."""
    import wandb
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return wandb.Image(Image.open(buffer), caption=caption)


def _settings(silent: bool):
    """wandb's settings for the harness's runs: silent unless the user asks otherwise, and the run's offline file
    written every FLUSH_EVERY_S seconds (wandb's default, 15 s, would lose that much when Slurm stops the
    service together with the job)."""
    import wandb

    values = {"silent": True} if silent else {}
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):  # wandb >= 0.22
        values["x_transaction_log_flush_interval"] = FLUSH_EVERY_S
    return wandb.Settings(**values) if values else None


def _stop_wandb_service() -> None:
    """wandb's service process outlives run.finish(); an atexit hook of wandb's stops it when Python exits. A
    process leaving after a stop must not leave that to the hook: a Slurm requeue or scancel signals every
    process of the job, the service among them, and the hook would then end the job's output in a traceback.
    wandb.teardown() unregisters the hook before it talks to the service, so it is done here, failing quietly
    if the service is gone already."""
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------------
# W&B's start, in a thread of its own


class WandbStart:
    """wandb's import, its mode, wandb.init and its fall-back to offline (start_wandb_run), in a daemon thread
    while training goes on. The thread writes only here: the Tracker takes the result over on the main thread
    (Tracker._take_over), which alone touches the Accelerator's trackers and the console. Daemon: a process that
    leaves without waiting for it (a crash) is not held up by a hanging online start."""

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


def _redirects_console() -> bool:
    """Whether wandb captures the console by redirecting file descriptors (console: redirect, from WANDB_CONSOLE
    or wandb's settings files): that installs a SIGWINCH handler, which only the main thread may; such a start
    stays on the main thread. Settings that cannot be read count as redirect: the main thread is always safe."""
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.console).lower() not in ("wrap", "off", "wrap_raw", "wrap_emu")
    except Exception:
        return True


def _started_tracker(project: str, config: dict | None, init: dict):
    """Accelerate's W&B tracker, made and started as accelerator.init_trackers makes and starts it, but not
    registered on the Accelerator: its thread leaves accelerator.trackers to the main thread, whose
    accelerator.log reads them meanwhile, and init_trackers would start TensorBoard's tracker a second time."""
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

    configured = _configured_mode()
    mode, why_offline = None, None
    if configured is None and not has_credentials():
        mode, why_offline = "offline", "no credentials found: `wandb login` or WANDB_API_KEY"
    elif configured == "offline":
        why_offline = "offline mode"
    silence = not any(os.environ.get(v) for v in ("WANDB_SILENT", "WANDB_QUIET"))
    # wandb's own banner and footer would interleave with the harness's output: the harness prints the run's
    # address (or sync command) itself. wandb's warnings still show.
    init = {**init, "settings": _settings(silent=silence), **({"mode": mode} if mode else {})}
    try:
        job.tracker = _started_tracker(project, config, init)
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
            job.tracker = _started_tracker(project, config, init)
        except Exception as e2:
            job.failure = ("W&B could not start offline either", e2)
            return
    job.offline = bool(getattr(job.tracker.run.settings, "_offline", False)) or init.get("mode") == "offline"
    job.why_offline = why_offline


class Tracker:
    """The trackers of a training or evaluation. `Tracker.start(...)` never raises; every method is a no-op when
    they are off, failed, or this is not the main process."""

    def __init__(self, accelerator, console: RunConsole):
        self.accelerator = accelerator
        self.console = console
        self.run = None  # the wandb Run while W&B works, on the main process
        self.tensorboard: RunTensorBoard | None = None  # while TensorBoard is on, on the main process
        self.dropped_run = None  # the wandb Run a failure made the harness stop logging to, still to be closed
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.offline = False
        self.logged_before = -1  # highest step logged by earlier starts of this run: not logged again
        self.resumed_at = -1  # the step of the state this start resumed from (-1: a new start)
        self.last_step = -1
        self._step_written_at = 0.0
        self.starting: WandbStart | None = None  # W&B's start while it is under way
        self._queued: list[tuple[str, Any]] = []  # (what, action) for W&B meanwhile, in order
        self.stop_requested = lambda: False  # whether a stop was asked for: the loop's StopRequest.requested
        self.start_wait_s = 0.0  # how long the loop waited for W&B's start

    @property
    def active(self) -> bool:
        return self.run is not None

    # -- start ---------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, accelerator, console: RunConsole, *, log, run_name: str | None, run_dir: Path,
              config: dict | None, resumed: bool, resumed_at: int = -1, stop_requested=None) -> Tracker:
        """Start (or continue) the run directory's W&B run and TensorBoard folder, as log.active_trackers says.
        `log` is the LogConfig; `resumed`: whether this continues the run directory's training (then its W&B run
        id is reused, else a new one is made), from the state of step `resumed_at`. Returns while W&B is still
        starting, in the background (WandbStart)."""
        tracker = cls(accelerator, console)
        tracker.resumed_at = resumed_at if resumed else -1
        tracker.stop_requested = stop_requested or tracker.stop_requested
        if not accelerator.is_main_process:
            return tracker
        if "wandb" in log.active_trackers:
            tracker._start_wandb(log, run_name, Path(run_dir), config, resumed)
        if "tensorboard" in log.active_trackers:
            tracker._start_tensorboard(Path(run_dir), config, resumed)
        return tracker

    def _start_wandb(self, log, run_name, run_dir: Path, config, resumed: bool) -> None:
        if "wandb" not in [str(t) for t in getattr(self.accelerator, "log_with", [])]:
            self.console.warn("log.wandb=true but wandb is not installed (or the Accelerator was made without "
                              "log_with='wandb'): going on without W&B; pip install wandb, or pass log.wandb=false")
            return
        try:
            project, init = self._prepare(log, run_name, run_dir, resumed)
            import wandb  # noqa: F401  on the main thread, before the progress bar: see the module's docstring
        except Exception as e:  # a bug or an unexpected wandb: W&B is optional, training is not
            self._fail("W&B could not start", e)
            return
        job = WandbStart(lambda started: start_wandb_run(started, project, config, init))
        self.starting = job.start(in_thread=not _redirects_console())

    def _start_tensorboard(self, run_dir: Path, config, resumed: bool) -> None:
        """First in the Accelerator's trackers (W&B's joins them when its start is over): accelerator.log reaches
        it before W&B, whose failure then cannot cost it a row."""
        tensorboard = RunTensorBoard(run_dir, self.console)
        if not tensorboard.open(config, resumed):
            return
        self.tensorboard = tensorboard
        self.accelerator.trackers.insert(0, tensorboard)
        self.logged_before = self.last_step = max(self.logged_before, tensorboard.logged_before)
        tensorboard.logged_before = self.logged_before
        self.console.info(f"TensorBoard: tensorboard --logdir {_shown_path(tensorboard.folder)}")

    def _prepare(self, log, run_name, run_dir: Path, resumed: bool) -> tuple[str, dict]:
        """On the main thread, before W&B's start: the run id and the steps logged before (which the loop needs
        at once), wandb_run.json, and wandb.init's arguments other than its mode and settings."""
        record = read_run_file(run_dir) if resumed else None
        if resumed and record is None:
            self.console.info(f"no W&B run recorded in {run_dir} ({RUN_FILE}): starting a new W&B run")
        self.run_dir = run_dir
        self.run_id = record["id"] if record else sweep_run_id() or new_run_id()
        self.logged_before = self.last_step = int(record.get("last_step", -1)) if record else -1
        project, entity = self._where_it_was(record, log) if record else (log.project, log.entity)
        _write_run_file(run_dir, {"id": self.run_id, "project": project, "entity": entity,
                                  "last_step": self.last_step})
        # Here, on the main thread. (wandb's service start, in the thread, sets WANDB_SERVICE in os.environ: the
        # one change of the environment made beside the training, once, at its first seconds.)
        _keep_wandb_files_in(run_dir)
        return project, {"name": log.name or run_name, "entity": entity, "group": log.group,
                         "tags": list(log.tags) or None, "dir": str(run_dir), "id": self.run_id, "resume": "allow"}

    def wait_for_wandb(self, patience_s: float | None = None) -> None:
        """Wait for W&B's start, if it is under way, and take its run over (what was queued meanwhile is logged).
        Without patience_s the wait ends early only when a stop is asked for (a signal, Ctrl-C: the checkpoint
        comes first); with it, after that many seconds. A start waited for in vain is abandoned."""
        if self.starting is None:
            return
        give_up = self.stop_requested if patience_s is None else (lambda: False)
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

    def settle_start(self) -> None:
        """On the way out, whatever the path: a start still under way gets a few seconds, then is abandoned."""
        if self.starting is not None:
            self.wait_for_wandb(patience_s=START_PATIENCE_S)

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

    def _announce(self, why_offline: str | None) -> None:
        if self.run is None:
            return
        if getattr(self.run.settings, "_noop", False):
            self.console.info("W&B disabled (WANDB_MODE=disabled)")
            return
        if self.offline:
            self.console.info(f"W&B run {self.run_id} is logged offline ({why_offline or 'offline mode'}); upload "
                              f"it later with: {self.sync_command()}")
        else:
            self.console.info(f"W&B run {self.run_id}: {self.run.url}")

    def sync_command(self) -> str:
        """The `wandb sync` command that uploads this run's offline folders (all of its starts, oldest first)."""
        segments = sorted((self.run_dir / "wandb").glob(f"offline-run-*-{self.run_id}"))
        if len(segments) <= 1:
            here = segments[0] if segments else Path(self.run.settings.sync_dir)
            return f"wandb sync {_shown_path(here)}"
        pattern = _shown_path(self.run_dir / "wandb") + f"/offline-run-*-{self.run_id}"
        return f"wandb sync --id {self.run_id} {pattern}"

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

    # -- logging -------------------------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        """Whether a tracker (W&B, starting or started, TensorBoard) is on."""
        return self.run is not None or self.starting is not None or self.tensorboard is not None

    def is_new(self, step: int, epoch_row: bool = False) -> bool:
        """Whether to log at `step`: steps an earlier start of this run already logged are skipped (they were
        trained again after a crash), so the history never goes backwards. An epoch's row (val/*, its figures) at
        the very step this start resumed from is new: the earlier start stopped after the epoch's last batch,
        before its test pass, having logged only that step's train/*."""
        return step > self.logged_before or (epoch_row and step == self.logged_before == self.resumed_at)

    def log(self, values: dict, step: int, epoch_row: bool = False) -> None:
        """accelerator.log at the global step, to every tracker, if it is new (is_new). While W&B is starting,
        its row is queued; an epoch's row waits for the start: the queue never outlasts the first epoch."""
        if not self.logging or not self.is_new(step, epoch_row):
            return
        if epoch_row:
            self.wait_for_wandb()
        if step == self.logged_before:  # an epoch's row at the step this start resumed from: see _wandb_step
            if self.tensorboard is not None:
                self.tensorboard.log(values, step=step)
            self._log_wandb(values, step, epoch_row)
            return
        if self._still_starting():  # TensorBoard now; W&B, not among the Accelerator's trackers yet, later
            self.accelerator.log(values, step=step)
            row = dict(values)
            self._queued.append(("logging", lambda: self.accelerator.get_tracker("wandb").log(row, step=step)))
        elif self.run is not None:
            self._guard("logging", lambda: self.accelerator.log(values, step=step))
        else:  # TensorBoard alone: its tracker turns its own failures into a warning
            self.accelerator.log(values, step=step)
        self._logged(step)

    def _log_wandb(self, values: dict, step: int, epoch_row: bool = False) -> None:
        """A row of W&B objects (images, tables, charts) to W&B's tracker alone."""
        self.wait_for_wandb()
        if self.run is None or not self.is_new(step, epoch_row):
            return
        self._guard("logging", lambda: self.accelerator.get_tracker("wandb").log(values, step=self._wandb_step(step)))
        self._logged(step)

    def _wandb_step(self, step: int) -> int:
        """A resumed W&B run goes on from the step after the last it holds and drops rows at earlier steps: an
        epoch's row at the step this start resumed from (is_new) goes one step later, where nothing else is (its
        charts are against `epoch`, define_epoch_metrics)."""
        return step + 1 if step == self.logged_before else step

    def _logged(self, step: int) -> None:
        if step > self.last_step:
            self.last_step = step
            if self.run is not None and time.monotonic() - self._step_written_at > STEP_FILE_EVERY_S:
                self.save_step()

    def save_step(self) -> None:
        """Remember the last logged step in the run directory (read back when the run resumes)."""
        if self.run_dir is None or self.run_id is None:
            return
        record = read_run_file(self.run_dir) or {"id": self.run_id}
        if record.get("id") == self.run_id:
            record["last_step"] = self.last_step
            try:
                _write_run_file(self.run_dir, record)
            except OSError:
                pass
        self._step_written_at = time.monotonic()

    def define_epoch_metrics(self) -> None:
        """Epoch-level charts (val/*, the epoch's train loss, perf/*, figures) use `epoch` as their x-axis."""
        def define():
            self.run.define_metric("epoch")
            for pattern in ("val/*", "val_ema/*", "train/epoch_loss", "perf/*", "figures/*", "latent/*"):
                self.run.define_metric(pattern, step_metric="epoch")
            # the run's summary keeps the best (lowest) test loss, not the last; the final table says both
            self.run.define_metric("val/loss", step_metric="epoch", summary="min")
        self._to_wandb("defining metrics", define)

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
        if self.tensorboard is not None:
            self.tensorboard.log_figures(figures, step, prefix)
            self._logged(step)
        self.wait_for_wandb()
        if self.run is None:
            return

        def build() -> dict:
            import wandb

            from .plots import project_2d

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

        values = self._guard("preparing the figures", build)
        if values:
            self._log_wandb(values, step, epoch_row=True)

    def log_evaluation(self, results: dict, figures: dict, latents, labels) -> None:
        """evaluate.py's numbers as eval/* (history row after the run's last step, and summary), its figures
        as eval/figures/*, the latent table as eval/latent/means, and the KL of each latent dimension."""
        self.wait_for_wandb()
        if self.run is None:
            return
        step = self.last_step + 1
        scalars = {f"eval/{key}": results[key] for key in ("nelbo", "recon", "kl", "iwae_nll", "active_units",
                                                            "iwae_k", "checkpoint_epoch", "n_images")
                   if isinstance(results.get(key), (int, float))}

        def kl_chart() -> dict:
            import wandb

            table = wandb.Table(columns=["dimension", "kl"], data=[[i, v] for i, v in
                                                                   enumerate(results["kl_per_dim"])])
            return {"eval/kl_per_dim": wandb.plot.bar(table, "dimension", "kl", title="KL per latent dimension "
                                                      "(nats per image); near 0: an inactive unit")}

        chart = self._guard("preparing the KL chart", kl_chart) or {}
        self.log({**scalars, **chart}, step)
        if figures:
            self.log_figures(figures, latents, labels, results.get("checkpoint_epoch") or 0, step, prefix="eval/")
        self.summary({**scalars, "eval/kl_per_dim_values": results["kl_per_dim"],
                      "eval/checkpoint": results["checkpoint"]})

    def log_model_file(self, path: Path, *, epoch: int, best: bool, metrics: dict) -> None:
        """One artifact version per epoch: aliases latest, epoch-N, and best when it is the best so far."""
        self.wait_for_wandb()
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
        self.wait_for_wandb()
        if self.run is None:
            return
        self._guard("writing the summary", lambda: self.run.summary.update(values))

    def interrupted(self, preempted: bool, exit_code: int) -> None:
        """Training is leaving early (an exception): finish the W&B run with the process's exit code.
        preempted: stopped by a signal to be resumed (Slurm preemption, time limit), which W&B then shows as
        preempted rather than failed. A run W&B failed on earlier is closed too: when a job-wide SIGTERM (scancel)
        kills wandb's service, the next log call often fails before the harness sees its own SIGTERM.
        TensorBoard's event file is closed first: complete, whatever W&B does. A start still under way is waited
        for a few seconds (START_PATIENCE_S): what was queued meanwhile reaches W&B before it is finished."""
        self._close_tensorboard()
        self.wait_for_wandb(patience_s=START_PATIENCE_S)
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
        _stop_wandb_service()

    def _close_without_the_service(self, preempted: bool, exit_code: int, error: Exception) -> None:
        """wandb's service died before the run was finished: scancel and Slurm's other SIGTERMs reach every process
        of the job, the service too (wandb #9963). What it had not written yet is lost (at most the last
        FLUSH_EVERY_S seconds); a new start of the same W&B run, in a folder of its own, records how the run
        ended, so that it shows as preempted (or failed), not crashed."""
        import wandb

        _stop_wandb_service()
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

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.finish()
            self.accelerator.trackers = [t for t in self.accelerator.trackers if t is not self.tensorboard]
            self.tensorboard = None

    def end_training(self) -> None:
        """accelerator.end_training() on every process (finishes the W&B run, closes TensorBoard's event file,
        destroys the process group), with a W&B failure at the end turned into a warning. TensorBoard, first among
        the Accelerator's trackers, is closed before W&B is finished (after a start still under way, and what it
        queued)."""
        self.wait_for_wandb()
        if self.run is not None:
            self.save_step()
        try:
            self.accelerator.end_training()
        except Exception as e:
            if self.run is None and not any(getattr(t, "name", None) == "wandb" for t in self.accelerator.trackers):
                raise
            self._fail("W&B failed while finishing the run", e)
            self.accelerator.end_training()  # the process group still needs destroying
        self.run = self.tensorboard = None
        if self.dropped_run is not None:  # W&B failed earlier: close what it kept, and stop its service here
            try:
                self.dropped_run.finish()
            except Exception:
                pass
            self.dropped_run = None
            _stop_wandb_service()
