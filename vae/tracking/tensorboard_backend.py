"""TensorBoard (log.trackers=[tensorboard]) through Accelerate's own TensorBoardTracker: the event files of a run in
<run dir>/tensorboard/. RunTensorBoard is that tracker; TensorBoardBackend is what vae.tracking.Tracker calls.

- One folder per run directory, across restarts: a resumed run writes another event file into the same folder,
  and TensorBoard shows the folder's files as one run. Steps an earlier start logged are not logged again (the
  last one is read back from the folder's event files, which every log call flushes: exact even after kill -9).
  A start that does not resume (nothing was checkpointed) moves the earlier start's files into a subfolder.
- The config goes in as hparams (flattened: train.lr, model.hidden, ...), the figures as images.
- Never fatal: a failing write (disk full) warns once, and training goes on without TensorBoard.
- tensorboard is an optional dependency: `require()` turns its absence into a one-line error before training.

TensorBoardBackend starts it next to W&B and registers it on the Accelerator (accelerator.trackers,
accelerator.get_tracker reach it); it is not passed as Accelerator(log_with=...), because init_trackers starts
every tracker of log_with together, and W&B's start (with its fall-back to offline) must not start it twice.
"""

from __future__ import annotations

import io
import json
import struct
from datetime import datetime
from pathlib import Path

from accelerate.tracking import TensorBoardTracker

from ..config import ConfigError, flat_keys
from ..console import RunConsole
from ..errors import first_line
from .backend import Backend, shown_path

FOLDER = "tensorboard"
MISSING = ("log.trackers has tensorboard but the tensorboard package is not installed: pip install tensorboard, "
           "or drop it from log.trackers")


def require() -> None:
    """Stop with one line where torch's SummaryWriter (what Accelerate's tracker writes with) cannot be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None


def last_logged_step(folder: Path) -> int:
    """The highest step of a summary in the folder's event files; -1 when there is none. Read record by record
    (TFRecord framing: length, its CRC, the Event, its CRC; the CRCs are not checked), stopping where a crash cut a
    file short."""
    from tensorboard.compat.proto.event_pb2 import Event

    last = -1
    for path in Path(folder).glob("events.out.tfevents.*"):
        with path.open("rb") as f:
            while len(header := f.read(12)) == 12:
                (length,) = struct.unpack("<Q", header[:8])
                data = f.read(length)
                if len(data) < length or len(f.read(4)) < 4:
                    break
                try:
                    event = Event.FromString(data)
                except Exception:  # a record cut short
                    break
                if event.HasField("summary"):
                    last = max(last, event.step)
    return last


def hparams(config: dict) -> dict:
    """The config tree as TensorBoard hparams: dotted keys, each value a number or a string."""
    def plain(value):
        if isinstance(value, bool) or value is None or isinstance(value, (list, tuple)):
            return json.dumps(value)  # TensorBoard would make true 1.0, and skip null and lists
        return value

    return {key: plain(value) for key, value in flat_keys(config).items()}


def png_array(fig):
    """A matplotlib Figure as an HWC uint8 array (rendered here, as for W&B: pyplot is never involved)."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


class RunTensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoardTracker, writing into <run dir>/tensorboard/ itself (Accelerate's would add a
    folder named after the W&B project), skipping the steps the folder already holds, and turning its failures
    into one warning. Made on the main process only."""

    def __init__(self, run_dir: Path, console: RunConsole):
        # run_name "": Accelerate joins it to logging_dir, so the event files go into the folder itself
        super().__init__(run_name="", logging_dir=str(Path(run_dir) / FOLDER))
        self.folder = Path(run_dir) / FOLDER
        self.console = console
        self.logged_before = -1  # highest step the folder holds from earlier starts: not logged again
        self.failed = False

    def open(self, config: dict | None, resumed: bool) -> bool:
        """Start the writer; the config as hparams. False (after a warning) when TensorBoard cannot start."""
        try:
            if resumed:
                self.logged_before = last_logged_step(self.folder)
            else:
                self._move_earlier_start_aside()
            self.start()
            if config is not None:
                self.store_init_configuration(config)
        except Exception as error:
            self._fail("TensorBoard could not start", error)
            return False
        return True

    def _move_earlier_start_aside(self) -> None:
        """A start that does not resume trains from step 0: an earlier start's event files (one that crashed before
        its first checkpoint) go into a subfolder, a run of its own in TensorBoard, instead of mixing with these."""
        earlier = sorted(self.folder.glob("events.out.tfevents.*"))
        if earlier:
            aside = self.folder / f"earlier-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for path in earlier:
                path.rename(aside / path.name)

    def store_init_configuration(self, values: dict) -> None:
        """The config as hparams, in the run's own event file (torch's add_hparams would make a folder per call)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams(values), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    # -- what the run logs -------------------------------------------------------------------------------------

    def _guarded(self, what: str, action) -> None:
        if self.failed or getattr(self, "writer", None) is None:  # failed, or closed already
            return
        try:
            action()
        except Exception as error:
            self._fail(f"TensorBoard failed while {what}", error)

    def _fail(self, what: str, error: BaseException) -> None:
        """Warn once and go on without TensorBoard."""
        if not self.failed:
            self.console.warn(f"{what} ({first_line(error)}); going on without TensorBoard (metrics.jsonl and the "
                              f"figures are written as usual)")
        self.failed = True

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        """Accelerate's log (numbers as scalars); the Tracker has left out the steps the folder holds (Steps)."""
        self._guarded("logging", lambda: super(RunTensorBoard, self).log(values, step=step, **kwargs))

    def log_figures(self, figures: dict, step: int, prefix: str = "") -> None:
        """name.png -> matplotlib Figure, as images <prefix>figures/<name>."""
        def add() -> None:
            for name, fig in figures.items():
                self.writer.add_image(f"{prefix}figures/{name.removesuffix('.png')}", png_array(fig),
                                      global_step=step, dataformats="HWC")
            self.writer.flush()

        self._guarded("logging the figures", add)  # the Tracker has left out the steps the folder holds

    def finish(self) -> None:
        """Close the writer: everything logged is in the event file."""
        if getattr(self, "writer", None) is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception as error:
                self._fail("TensorBoard failed while closing its event file", error)


class TensorBoardBackend(Backend):
    """log.trackers=[tensorboard]: a RunTensorBoard while it is on, on the main process."""

    name = "tensorboard"

    def __init__(self, accelerator, console: RunConsole, steps):
        super().__init__(accelerator, console, steps)
        self.tracker: RunTensorBoard | None = None  # while TensorBoard is on

    @property
    def on(self) -> bool:
        return self.tracker is not None

    def start(self, log, run_name: str | None, run_dir: Path, config: dict | None, resumed: bool) -> None:
        """First in the Accelerator's trackers (W&B's joins them when its start is over), as the Tracker calls it
        first: W&B's failure or wait then cannot cost it a row."""
        tensorboard = RunTensorBoard(run_dir, self.console)
        if not tensorboard.open(config, resumed):
            return
        self.tracker = tensorboard
        self.accelerator.trackers.insert(0, tensorboard)
        self.steps.held(tensorboard.logged_before)
        tensorboard.logged_before = self.steps.logged_before
        self.console.info(f"TensorBoard: tensorboard --logdir {shown_path(tensorboard.folder)}")

    def log(self, values: dict, step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(values, step=step)

    def log_figures(self, figures: dict, latents, labels, epoch: int, step: int, prefix: str = "",
                    points: int = 0) -> bool:
        """The figures as images <prefix>figures/<name> (the latent table is W&B's alone)."""
        if self.tracker is None:
            return False
        self.tracker.log_figures(figures, step, prefix)
        return True

    def interrupted(self, preempted: bool, exit_code: int) -> None:
        """Closed before W&B is waited for and finished: the event file is complete, whatever W&B does."""
        self.end()

    def end(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.accelerator.trackers = [t for t in self.accelerator.trackers if t is not self.tracker]
            self.tracker = None
