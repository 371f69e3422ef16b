"""log.per_rank_logs: each process's output also in <run dir>/logs/rank-<r>.log, so that what rank 5 of 16 said
can be found (the launcher mixes every process's lines into one stream, and only rank 0 prints the run's
progress).

The copy is made at the file-descriptor level, so C and C++ output (NCCL's warnings, torch's own messages) is in
the log as well as Python's. It lasts until the process exits: an atexit hook, which the entry points run
before they leave, drains what is left and puts the original descriptors back. An error every process stops
with is printed once per node (vae.errors); the other processes write theirs into their own log only.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

from ..storage.files import open_append


class RankLog:
    """Copies everything written to stdout and stderr into `path` too (appending: a resumed run adds to it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open_append(path)  # held open for the life of the process
        self.lock = threading.Lock()
        self.streams: list[tuple[int, int, threading.Thread]] = []  # (fd, its original, the copying thread)
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            stream.flush()
            original, (read_end, write_end) = os.dup(fd), os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._copy, args=(read_end, original), daemon=True,
                                      name=f"rank-log-{fd}")
            thread.start()
            self.streams.append((fd, original, thread))
        atexit.register(self.close)

    def write_line(self, line: str) -> None:
        with self.lock:
            self.file.write(line.encode() + b"\n")

    def _copy(self, read_end: int, original: int) -> None:
        while data := os.read(read_end, 65536):
            os.write(original, data)
            with self.lock:
                self.file.write(data)
        os.close(read_end)

    def close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, original, thread in self.streams:
            os.dup2(original, fd)  # the pipe's last write end closes: the thread reads to its end and stops
            os.close(original)
            thread.join(timeout=5)
        self.streams.clear()
        self.file.close()


_current: RankLog | None = None


def start_rank_log(run_dir: Path, rank: int) -> RankLog:
    global _current
    _current = RankLog(Path(run_dir) / "logs" / f"rank-{rank}.log")
    return _current


def log_only(line: str) -> None:
    """A line for this process's own log (when log.per_rank_logs is on), not for the launch's shared output."""
    if _current is not None and _current.streams:
        _current.write_line(line)
