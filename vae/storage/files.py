"""Opening files for writing inside a run directory without following symbolic links.

A run directory may be shared (a group's scratch space): whoever can write into it could replace `.lock`,
`starts.jsonl` or a log with a link to another user's file, and a harness that opened it for writing would
truncate or append to that file. Every file the harness writes there is opened with O_NOFOLLOW: a link is refused
in one line that names it. (Files written atomically are created under a fresh temporary name with O_EXCL, which
fails on a link too, and renamed over the final name, which replaces a link rather than writing through it.)
Torch-free: vae.cluster.preemption, read by the Slurm scripts without torch, uses it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

from ..errors import TrainingError


def open_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a link at `path` itself; a link there is a TrainingError naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP and Path(path).is_symlink():
            raise TrainingError(f"{path} is a symbolic link (to {os.readlink(path)}); the harness never writes "
                                f"through a link there: remove the link and run the same command again") from None
        raise


def open_append(path: Path) -> BinaryIO:
    """`path` opened for appending bytes (created if missing), unbuffered."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", buffering=0)


def create_new(path: Path) -> BinaryIO:
    """A file that did not exist (O_EXCL: an existing file or link there is an error), opened for writing bytes."""
    return os.fdopen(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb")


def file_in_the_way(path: Path) -> Path | None:
    """The file (not a folder) at `path` or at one of its parents that keeps `path` from being a folder: None
    when `path` is a folder or can be made one. Checked before any long work, which would fail there at the end."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None
