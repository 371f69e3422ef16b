"""Running one command of the GPU check (benchmarks/gpu_check.py): in the repository root, in its own process group
(a time limit ends the children it started too), its output appended to a log file in --out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    rc: int | None  # None: ended at its time limit
    seconds: float
    text: str  # what this command wrote to the log
    cut_by_deadline: bool = False  # its limit was the time left, not its own cap

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def _end_group(proc: subprocess.Popen) -> None:
    # SIGINT first: pytest then still writes its JUnit XML for the tests done so far, and train.py stops at a
    # checkpoint; SIGTERM and SIGKILL only for what does not listen.
    for sig, grace in ((signal.SIGINT, 10), (signal.SIGTERM, 3), (signal.SIGKILL, 2)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log: Path, timeout: float, extra_env: dict | None = None) -> Outcome:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:  # timed out, or this check itself is being stopped
                _end_group(proc)
        out.write(f"[exit {rc if rc is not None else 'timed out'} after {time.monotonic() - started:.1f} s]\n")
    with log.open() as f:
        f.seek(offset)
        return Outcome(rc, time.monotonic() - started, f.read())


def error_line(text: str) -> str:
    """The line that says why a command failed: its `error:` line, else its last line (a traceback's end)."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("[exit ")]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]
