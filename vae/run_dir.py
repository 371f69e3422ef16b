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

from . import checkpoint
from .config import Config
from .console import RunConsole
from .errors import TrainingError
from .files import open_fd


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
        os.ftruncate(fd, 0)
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, f"process {os.getpid()} on {platform.node()}, started {started}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _holds_a_run(run_dir: Path) -> bool:
    return any(not path.name.startswith((".lock", ".write-test-")) for path in run_dir.iterdir())


def prepare_run_dir(cfg: Config, accelerator: Accelerator, console: RunConsole) -> tuple[bool, RunDirLock | None]:
    """The main process makes sure the run directory is writable, takes its lock (a second training there stops
    here, before touching anything) and, with train.resume=false, moves an old run aside. Returns, on every
    process, whether to resume, and the lock (the main process's; None elsewhere)."""
    run_dir, lock = cfg.run_dir, None
    if accelerator.is_main_process:
        writable_or_fail(run_dir)
        lock = RunDirLock(run_dir).acquire()
        if not cfg.train.resume and _holds_a_run(run_dir):
            moved = run_dir.with_name(f"{run_dir.name}.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(moved)  # the lock file goes along, still held, until the new directory's is taken
            writable_or_fail(run_dir)
            old, lock = lock, RunDirLock(run_dir).acquire()
            old.release()
            console.info(f"train.resume=false: moved the previous run to {moved}")
    accelerator.wait_for_everyone()
    return bool(checkpoint.complete_states(run_dir)) and cfg.train.resume, lock


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
