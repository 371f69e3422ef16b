"""`accelerate launch` for the Slurm scripts' several-process jobs, with the harness's exit codes kept.

    python -m vae.launcher [accelerate launch options] train.py --config ... [section.key=value ...]

Accelerate's launcher (torchrun's agent inside) reports any worker's non-zero exit as a traceback of its own and
exits 1: after a planned stop (130, 138, 140, 143: stopped by a signal after a checkpoint, resumable) a job's
output would end in a traceback and Slurm would record 1. Here the same launch ends with one line and the
workers' own exit code; any other failure keeps the launcher's summary of it (the workers print their own
errors above it). One process needs none of this: the scripts run `python train.py` then.
"""

from __future__ import annotations

import sys

from .preemption import EXIT_CODES

PLANNED = frozenset(EXIT_CODES.values())


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as error:
        codes = sorted({failure.exitcode for failure in error.failures.values()})
        if len(codes) != 1 or codes[0] not in PLANNED:
            raise
        print(f"launcher: the training processes stopped as planned (exit code {codes[0]})", file=sys.stderr)
        return codes[0]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
