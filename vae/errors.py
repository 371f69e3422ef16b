"""The one exception type the entry points turn into a one-line message (and a non-zero exit) for the user, and
the wrapper that does it for train.py and evaluate.py."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

from .cluster.exit_records import record_exit

# What a collective (all-reduce, barrier) raises when another process of the launch has died: gloo's connection
# is closed or reset, NCCL's communicator is aborted or its backend fails, the rendezvous store is gone. Any other
# failure of a collective (a desync, a CUDA error) may be this process's own bug and keeps its traceback.
_LOST_PEER_TYPES = {"DistNetworkError", "DistStoreError", "DistBackendError"}
_LOST_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
# ...and when another process stopped answering (hung, stopped, a dead node): the collective timed out after the
# process group's timeout (train.dist_timeout_s). gloo: "Timed out waiting ...ms for recv", its barrier and store
# their own wording; NCCL's watchdog: "Watchdog caught collective operation timeout". Only torch's distributed
# errors (and the RuntimeError gloo raises) are read this way: another error that says "timeout" keeps its
# traceback.
_TIMEOUT_TYPES = {"RuntimeError", "DistError", "DistBackendError", "DistStoreError", "DistNetworkError"}
_TIMEOUT_TEXT = ("timed out", "timeout")


class HarnessError(Exception):
    """Something the user can fix: bad config, missing data, unusable checkpoint, wrong launch. One line."""

    exit_code = 1

    def __str__(self) -> str:
        # Messages quote user input (keys, values, paths); a newline in that input must not break the line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class TrainingError(HarnessError):
    """Training cannot go on (wrong launch, non-finite loss, incompatible or busy run directory)."""


def first_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def is_rank_zero() -> bool:
    """Before Accelerate exists: is this the process that should speak for the launch?"""
    return os.environ.get("RANK", "0") in ("", "0")


def _speaks_for_its_node() -> bool:
    """The first process of each node. An error every process raises alike (a config error, an agreed stop) is
    printed once per node; one that only another node's processes hit (its local data root, its disk) still
    reaches the user."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def lost_peer(error: BaseException) -> str | None:
    """With several processes, a collective that failed because another process stopped first (that one prints
    its own reason): one line saying so, instead of this process's traceback. None for any other error."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not isinstance(error, Exception):
        return None
    text, rank = str(error).strip(), os.environ.get("RANK", "?")
    if type(error).__name__ in _TIMEOUT_TYPES and any(marker in text.lower() for marker in _TIMEOUT_TEXT):
        return (f"process rank {rank} stopped: another process of this launch did not answer within the process "
                f"group's timeout (train.dist_timeout_s; here: {first_line(error)[:160]})")
    if type(error).__name__ not in _LOST_PEER_TYPES and not any(marker in text for marker in _LOST_PEER_TEXT):
        return None
    return (f"process rank {rank} stopped: another process of this launch stopped first "
            f"(its own error is printed above; here: {first_line(error)[:160]})")


def run_entry_point(body: Callable[[], object], interrupted: str) -> int:
    """Run an entry point's work; every way it can fail that the user can act on ends as one `error:` line on
    stderr and an exit code, never a traceback. Returns the exit code."""
    try:
        body()
    except HarnessError as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr)
        elif _speaks_for_its_node():
            print(f"error: (process rank {os.environ.get('RANK')}) {error}", file=sys.stderr)
        else:
            from .cluster.rank_logs import log_only

            log_only(f"error: (process rank {os.environ.get('RANK')}) {error}")
        return error.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run's own handler is installed
        if is_rank_zero():
            print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130
    except Exception as error:
        message = lost_peer(error)
        if message is None:
            raise  # a bug, not a user's problem: the traceback is what a report needs
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def exit_now(code: int) -> None:
    """Leave the process with `code` once its work is done and written: the atexit hooks run (W&B's teardown and
    temporary-file cleanup among them), output is flushed, then os._exit. Python's own shutdown would spend
    another one to three seconds tearing down torch's modules, with nothing left to save. Under a profiler or a
    tracer (cProfile, coverage, a debugger), which write their results at exit, the exit is Python's own. Under
    vae.cluster.launcher the code is recorded first: the launcher's own exit code is decided from the records."""
    record_exit(code)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
