"""The run directory: one training at a time (a lock), room on its disk, whether it can be written, and the
metrics.jsonl rows a resumed run keeps."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator

from ..config import Config, dump_yaml
from ..console import RunConsole
from ..datasets import check_dataset_paths
from ..datasets.batches import TrainingData
from ..errors import TrainingError
from ..storage import checkpoint
from ..storage.files import file_in_the_way, open_fd
from .launch import StepChoice, environment_info


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= up_to_epoch:
                rows.append(row)
    # keep one row per epoch (the last written), in epoch order
    return sorted({row["epoch"]: row for row in rows}.values(), key=lambda r: r["epoch"])


class RunDirLock:
    """One training per run directory: the main process holds an exclusive flock on <run_dir>/.lock for the whole
    run. The kernel drops it when the process ends, however it ends, so a lock whose holder died never blocks."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = run_dir, None

    def acquire(self) -> RunDirLock:
        fd = open_fd(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TrainingError(f"{self.run_dir} is being trained by {holder}; wait for that run to end, or pass "
                                f"run.dir=<another directory>") from None
        except OSError as e:  # ENOSYS, ENOLCK, EOPNOTSUPP: Lustre mounted noflock, some NFS
            os.close(fd)
            raise TrainingError(f"cannot lock {self.run_dir / '.lock'} ({e.strerror}): this file system has no "
                                f"flock; pass run.lock=false to train without the lock (then nothing stops a "
                                f"second training in the same run directory), or put run.dir on another file "
                                f"system") from None
        os.ftruncate(fd, 0)
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, f"process {os.getpid()} on {platform.node()}, started {started}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


# Written into a run directory at its first start. Only a directory holding it (or, made before it existed, what
# only a run holds: a run's starts.jsonl or metrics.jsonl beside its config.yaml, or a full state) is ever resumed,
# written over or moved aside: run.dir=. or ~/Documents by mistake must not replace a user's own config.yaml,
# summary.json or loss.png, nor move their files away.
RUN_MARKER = ".vae-run"
_NOT_CONTENT = (".lock", ".write-test-", RUN_MARKER)  # the harness's own bookkeeping


def is_a_run(run_dir: Path) -> bool:
    if (run_dir / RUN_MARKER).is_file() or checkpoint.complete_states(run_dir):
        return True
    return (run_dir / "config.yaml").is_file() and any((run_dir / name).is_file() for name in ("starts.jsonl",
                                                                                              "metrics.jsonl"))


def _holds_anything(run_dir: Path) -> bool:
    return any(not path.name.startswith(_NOT_CONTENT) for path in run_dir.iterdir())


def check_run_dir(run_dir: Path) -> None:
    """Every process, before anything is written: run.dir is new, empty, or a run directory of this harness."""
    try:
        blocker = file_in_the_way(run_dir)
        foreign = run_dir.is_dir() and not is_a_run(run_dir) and _holds_anything(run_dir)
    except OSError as e:  # a folder on the way that this user may not look into
        raise TrainingError(f"run.dir {run_dir} cannot be used ({e.strerror}: {e.filename}); pass run.dir=<a "
                            f"directory you can write>") from None
    if blocker is not None:
        raise TrainingError(f"run.dir {run_dir} cannot be a directory: {blocker} is a file; pass run.dir=<a new or "
                            f"empty directory, or a run's>")
    if foreign:
        raise TrainingError(f"run.dir {run_dir} holds files but is not a run directory (no {RUN_MARKER}): a "
                            f"training would write over them (config.yaml, summary.json, the PNGs); pass "
                            f"run.dir=<a new or empty directory> (or, for a run of this harness's older "
                            f"versions, touch {run_dir / RUN_MARKER})")


def check_paths(cfg: Config) -> None:
    """Every process, first of all: run.dir can be this run's, and the dataset's paths can be used (data.root a
    folder, data.train_path and data.test_path files)."""
    check_run_dir(cfg.run_dir)
    check_dataset_paths(cfg.data)


def prepare_run_dir(cfg: Config, accelerator: Accelerator, console: RunConsole) -> tuple[bool, RunDirLock | None]:
    """The main process makes sure the run directory is writable, takes its lock (a second training there stops
    here, before touching anything), marks it as a run and, with train.resume=false, moves an old run aside.
    Returns, on every process, whether to resume, and the lock (the main process's; None elsewhere)."""
    run_dir, lock = cfg.run_dir, None
    if accelerator.is_main_process:
        writable_or_fail(run_dir)
        lock = RunDirLock(run_dir).acquire() if cfg.run.lock else None
        if not cfg.train.resume and is_a_run(run_dir) and _holds_anything(run_dir):
            moved = _move_aside(run_dir)
            old, lock = lock, RunDirLock(run_dir).acquire() if cfg.run.lock else None
            if old is not None:
                old.release()
            console.info(f"train.resume=false: moved the previous run to {moved}")
        os.close(open_fd(run_dir / RUN_MARKER, os.O_WRONLY | os.O_CREAT))
    accelerator.wait_for_everyone()
    return bool(checkpoint.complete_states(run_dir)) and cfg.train.resume, lock


def _move_aside(run_dir: Path) -> Path:
    """Rename a run directory to <name>.old-<time> beside it and make a new one in its place. Where run.dir is a
    symbolic link (to scratch storage, say), the directory it points to is the one moved and made anew: the link
    keeps pointing where it did. The directory a user runs from (run.dir=.) cannot be moved from under them."""
    real = run_dir.resolve()
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise TrainingError(f"train.resume=false would move the run in {run_dir} aside, but it holds the current "
                            f"directory; run from another directory, or pass run.dir=<a new directory>")
    moved = real.with_name(f"{real.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    real.rename(moved)  # the lock file goes along, still held, until the new directory's is taken
    real.mkdir()
    writable_or_fail(run_dir)
    return moved


ROOM_FOR_LOGS_AND_FIGURES = 32 * 2**20  # metrics, PNGs, W&B's run files: a z2 run writes about 5 MiB of them


def full_state_bytes(model: torch.nn.Module, ema: bool = False) -> int:
    """About the size of one full training state: the float32 weights, Adam's two moments, and the weights'
    average when the run keeps one (train.ema_decay)."""
    return (4 if ema else 3) * _weight_bytes(model)


def _weight_bytes(model: torch.nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def space_needed(model: torch.nn.Module, cfg: Config) -> int:
    """Bytes a run directory needs at its fullest: train.keep_checkpoints full states plus the one being written
    before the oldest is pruned, last.pt and best.pt (weights only), the model files W&B stages for upload when
    log.checkpoint_artifacts is on, and room for logs and figures."""
    full_state, weights = full_state_bytes(model, cfg.train.ema_decay is not None), _weight_bytes(model)
    uploads = "wandb" in cfg.log.active_trackers and cfg.log.checkpoint_artifacts
    staged = 2 * weights * cfg.train.epochs if uploads else 0
    return (cfg.train.keep_checkpoints + 1) * full_state + 2 * weights + staged + ROOM_FOR_LOGS_AND_FIGURES


def _bytes_held(run_dir: Path) -> int:
    """What the run directory already holds of what space_needed counts (a resumed run reuses that room)."""
    held = 0
    for path in [run_dir / "last.pt", run_dir / "best.pt", *(run_dir / "checkpoints").rglob("*"),
                 *(run_dir / "wandb" / "data").rglob("*")]:
        try:
            held += path.stat().st_size if path.is_file() else 0
        except OSError:
            pass
    return held


def write_run_files(cfg: Config, accelerator: Accelerator, console: RunConsole, history: list[dict],
                    data: TrainingData, step: StepChoice) -> None:
    """Main process: config.yaml, environment.json and the metrics.jsonl rows the (resumed) run keeps; the run's
    first line."""
    run_dir = cfg.run_dir
    checkpoint.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    environment = environment_info(accelerator, step)
    checkpoint.atomic_write_text(run_dir / "environment.json", json.dumps(environment, indent=1))
    # Epochs after the resumed state were lost with the crash; they are about to be trained again.
    checkpoint.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    console.info(f"run directory {run_dir} | {accelerator.num_processes} process(es) on {accelerator.device} "
                 f"({accelerator.distributed_type}) | mixed precision {accelerator.mixed_precision} | "
                 f"global batch {cfg.train.batch_description} | {len(data.train_images)} train / "
                 f"{len(data.test_images)} test images | {step.describe()}")


def room_or_fail(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    needed = max(needed - _bytes_held(run_dir), ROOM_FOR_LOGS_AND_FIGURES)
    if free < needed:
        raise TrainingError(f"run directory {run_dir} has {free / 2**20:.1f} MiB free, this run needs about "
                            f"{needed / 2**20:.1f} MiB (checkpoints, model files, figures); free some space, "
                            f"lower train.keep_checkpoints or pass run.dir=<a roomier path>")


def disk_full_error(error: BaseException, run_dir: Path) -> TrainingError | None:
    """A write that failed for want of space, as the one-line error that says what is kept and what to do."""
    if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
        return None
    states = checkpoint.complete_states(run_dir)
    kept = f"the last complete checkpoint ({states[-1][1].name}) is kept" if states else "no checkpoint was saved yet"
    where = f" writing {error.filename}" if error.filename else ""
    return TrainingError(f"no space left on the device{where}: {kept}; free some space and run the same command "
                         f"again to resume")


def writable_or_fail(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run directory {run_dir} is not writable ({e.strerror}); pass run.dir=<a writable "
                            f"path> or free some space") from None
