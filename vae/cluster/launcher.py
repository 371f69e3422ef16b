"""`accelerate launch` for the Slurm scripts' several-process jobs, with the harness's exit codes kept.

    python -m vae.cluster.launcher [accelerate launch options] train.py --config ... [section.key=value ...]

Accelerate's launcher (torchrun's agent inside) reports any worker's non-zero exit its own way and exits 1: after
a planned stop (130, 138, 140, 143: stopped by a signal after a checkpoint, resumable) a job's output would end
in a traceback and Slurm would record 1. How it reports changes between releases (1.15 lets torchrun's
ChildFailedError through; 1.16 with --quiet prints it and exits 1), so the exit code is decided from what each
training process recorded as it left (vae.cluster.exit_records), whatever accelerate raised or printed: when all of
this node's processes stopped as planned with one code, the launch ends with one line and that code; any other
failure keeps accelerate's report of it (the workers print their own errors above it). One process needs none of
this: the scripts run `python train.py` then. (Pass no --quiet: it only makes accelerate 1.16 print torchrun's
failure block after a planned stop.)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .exit_records import RECORDS_DIR_ENV, read_exits
from .preemption import EXIT_CODES

PLANNED = frozenset(EXIT_CODES.values())


def planned_stop(records: list[dict]) -> int | None:
    """The exit code that every training process of this node recorded, when it is a planned stop's; None when
    one is missing (it crashed or was killed), the codes differ, or the code is not a planned stop's."""
    if not records or len(records) != records[0].get("local_world_size"):
        return None
    codes = {record["exit_code"] for record in records}
    if len(codes) != 1:
        return None
    code = next(iter(codes))
    return code if code in PLANNED else None


def exit_code_after(failure: BaseException, records: list[dict]) -> int:
    """The launcher's exit code after accelerate's launch ended in `failure` (an exception it let through, or its
    own sys.exit): the workers' planned stop, said in one line; anything else is accelerate's to report."""
    if isinstance(failure, SystemExit) and failure.code in (0, None):
        return 0
    code = planned_stop(records)
    if code is None:
        raise failure
    print(f"launcher: the training processes stopped as planned (exit code {code})", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vae-exits-") as folder:
        os.environ[RECORDS_DIR_ENV] = folder  # the training processes inherit it
        try:
            launch_command(args)
        except (Exception, SystemExit) as failure:
            return exit_code_after(failure, read_exits(Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
