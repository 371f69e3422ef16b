"""Checkpoints: full training states for resuming, and small self-contained model files for evaluation.

Layout of a run directory:
    checkpoints/step_00003600/ accelerate's save_state (model, optimizer, scheduler, scaler, RNG of every rank)
                               + trainer_state.json written last: it marks the state complete and says where
                               to go on (epoch, batches already done in it, step, best so far). Saved at the end
                               of epochs, and mid-epoch when a run is stopped by a signal.
    last.pt, best.pt           weights (the trained ones, or their EMA: "weights" says) + resolved config +
                               the image shape (C, H, W) the model was built for + epoch + metrics; plain
                               tensors and containers only, so they load with torch.load(..., weights_only=True)
                               and never run code. With the config's model.arch, enough to rebuild the model

Every write is atomic: files are written under a temporary name and renamed; a full state is written into
`.step_00003600.partial/` and renamed when complete. A crash mid-save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..errors import HarnessError, TrainingError, first_line
from .files import create_new

FORMAT_VERSION = 1
KIND = "vae-mnist-model"
# Model files written before they recorded the image shape hold MNIST models (then the only dataset).
LEGACY_IMAGE_SHAPE = (1, 28, 28)
STATE_DIR_PATTERN = re.compile(r"^step_(\d{8,})$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(HarnessError):
    """A checkpoint is missing, unreadable, or not one of ours; the message says which and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give every file under `directory` the mode the user's umask gives new files. Some writers ignore it:
    safetensors creates model.safetensors with mode 0600 whatever the umask, which would keep a group's shared
    run directory from being read by the group."""
    mode = 0o666 & ~current_umask()
    for path in Path(directory).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
        except OSError:
            pass  # not ours (another user's rank on a shared file system): leave it as its writer made it


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on an in-memory buffer, then write that to a temporary file next to `path`, fsync it and
    rename it over `path`. Buffered first because torch.save, writing straight into a file, turns a full disk
    into an unrelated-looking RuntimeError; written from Python, a full disk is the OSError it is (ENOSPC)."""
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed process with this pid (or a link: removed, not followed)
        with create_new(tmp) as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e  # name the file the user knows, not the temporary
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# What other writers say when the disk is full: safetensors (Rust's io::Error), and torch.save's stream writer,
# which reports a short write without its cause.
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_SHORT_WRITE_WORDS = ("file write failed", "unexpected pos")


def as_disk_full(error: BaseException, directory: Path, room_needed: int) -> OSError | None:
    """The failure of a write into `directory` by another library as OSError(ENOSPC) when a full disk is its cause:
    the error is ENOSPC/EDQUOT or says so, or it is a short write by torch.save (which hides the cause) and, with
    what it half-wrote removed, there is less room left than the write needed. None for any other failure."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return error
    if not isinstance(error, Exception):
        return None
    text = str(error)
    if any(words in text for words in _DISK_FULL_WORDS):
        return OSError(errno.ENOSPC, "No space left on device", str(directory))
    if any(words in text for words in _SHORT_WRITE_WORDS) and _free_bytes(directory) < room_needed:
        return OSError(errno.ENOSPC, "No space left on device", str(directory))
    return None


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 1 << 62  # unknown: not evidence of a full disk


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------------------
# Model files (last.pt / best.pt)


def save_model_file(path: Path, model: torch.nn.Module, config: dict, epoch: int, metrics: dict,
                    weights: str = "trained") -> None:
    """weights: which weights `model` holds, "trained" or "ema" (train.ema_decay's average), said in the file.
    The image shape comes from `model.image_shape`, which vae.models.build_model sets on every model."""
    payload = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()},
        "image_shape": [int(n) for n in model.image_shape],
        "weights": weights,
        "config": config,
        "epoch": int(epoch),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def load_model_file(path: str | Path) -> dict[str, Any]:
    """Load last.pt/best.pt safely (weights_only=True) and check it is a model file this harness can read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .pt file or a run directory")
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory; pass a .pt file inside it (e.g. {path}/last.pt)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files; the error says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(f"'{path}' was refused by the safe loader (weights_only=True): it holds objects other "
                              f"than tensors and plain containers{f' ({detail})' if detail else ''} and was not "
                              f"executed; use a last.pt/best.pt written by train.py") from None
    except Exception as e:  # torch.load raises many types on garbage (KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated or corrupt? {first_line(e)}); "
                              f"use another checkpoint, e.g. best.pt or last.pt of the run") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise CheckpointError(f"'{path}' is not a model file of this harness (expected last.pt/best.pt written "
                              f"by train.py)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format version {version!r}; this harness reads version "
                              f"{FORMAT_VERSION}. Re-train, or use the harness version that wrote it")
    return payload


def model_image_shape(payload: dict[str, Any], path: str | Path) -> tuple[int, int, int]:
    """The (C, H, W) a model file's model was built for; (1, 28, 28) for files written before it was recorded."""
    shape = payload.get("image_shape", LEGACY_IMAGE_SHAPE)
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise CheckpointError(f"'{path}' records the image shape {shape!r}, not (channels, height, width); use a "
                              f"last.pt/best.pt written by train.py")
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------------
# Full training states (checkpoints/step_NNNNNNNN/)


def state_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def partial_state_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f".step_{step:08d}.partial"


def read_trainer_state(directory: Path) -> dict | None:
    """The trainer state of a complete full checkpoint, or None when it is incomplete or unreadable."""
    try:
        state = json.loads((Path(directory) / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("epoch", "step",
                                                                                       "batches_done")):
        return None
    return state


def complete_states(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete full states in run_dir, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STATE_DIR_PATTERN.match(child.name)
            if match and child.is_dir() and read_trainer_state(child) is not None:
                found.append((int(match.group(1)), child))
    return sorted(found)


def commit_state(run_dir: Path, step: int, trainer_state: dict) -> Path:
    """Main process, after every rank has written into the partial directory: mark it complete, rename it."""
    partial = partial_state_dir(run_dir, step)
    atomic_write_text(partial / TRAINER_STATE, json.dumps(trainer_state, indent=1))
    final = state_dir(run_dir, step)
    if final.exists():  # an older save of the same step (e.g. after a resume that re-ran it)
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(final.parent)
    return final


def prune_states(run_dir: Path, keep: int, saved: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete states, and leftovers of interrupted saves. `saved`, the state
    just written, is always one of those kept: it may have a lower step than an older run's states (a resume
    from an earlier state re-trains those steps), and it is the one known to load."""
    removed = []
    states = [directory for _, directory in complete_states(run_dir)]
    if saved in states:  # counted as the newest
        states = [directory for directory in states if directory != saved] + [saved]
    for directory in states[:-keep] if keep > 0 else states:
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step_") and child.name.endswith(".partial"):
                shutil.rmtree(child, ignore_errors=True)
    return removed


def set_aside(directory: Path) -> Path:
    """Rename a full state that failed to load to `<name>.unloadable` (a numbered name if taken): no longer a
    state to resume from or to count as the newest when pruning, and still there for a person to look at."""
    target = directory.with_name(f"{directory.name}.unloadable")
    number = 1
    while target.exists():
        number += 1
        target = directory.with_name(f"{directory.name}.unloadable-{number}")
    os.replace(directory, target)
    return target


def save_full_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict, keep: int,
                    state_bytes: int) -> Path:
    """Every rank calls this: each writes its share of the state (model, optimizer, scheduler, scaler, its RNG)
    into the step's `.partial` folder; the main process then marks it complete (trainer_state.json, see
    vae.training.run_state) and prunes older states. state_bytes: about how much a state takes (to tell a full disk
    from other failures). A failure on any rank stops every rank with one line; the older states stay as they were."""
    step = trainer_state["step"]
    unfinished = partial_state_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(unfinished, ignore_errors=True)
        unfinished.mkdir(parents=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(unfinished))
    except Exception as error:  # e.g. the disk filled up
        failure = error
    # Every rank learns whether any failed (no rank left waiting for one that gave up), and why.
    reasons = gather_object([first_line(failure) if failure is not None else None])
    if any(reasons):
        if accelerator.is_main_process:  # give the space back
            shutil.rmtree(unfinished, ignore_errors=True)
        if failure is not None:
            disk_full = as_disk_full(failure, unfinished.parent, state_bytes)
            if disk_full is None or disk_full is failure:
                raise failure  # a full disk (train() says so in one line), or a bug whose traceback a report needs
            raise disk_full from failure
        raise TrainingError(f"could not save the checkpoint of step {step}: " + "; ".join(
            f"process rank {rank}: {reason}" for rank, reason in enumerate(reasons) if reason))
    if accelerator.is_main_process:
        follow_umask(unfinished)
        prune_states(run_dir, keep, saved=commit_state(run_dir, step, trainer_state))
    accelerator.wait_for_everyone()
    return state_dir(run_dir, step)
