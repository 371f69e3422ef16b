"""Runs side by side, without W&B: every run directory under a folder (a sweep, runs/) as one table and one PNG.

    python -m vae.report runs/z2-sweep            # the table; runs/z2-sweep/report.png: val/loss curves
    python -m vae.report runs --png /tmp/all.png

The table has the config keys that differ between the runs, best and final val/loss, epochs, training time and
status: finished, running (its lock is held), stopped (a requested stop: the same command resumes it) or failed
(anything else: an error, kill -9, a node gone). Runs still training are read as far as they got.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from pathlib import Path

import yaml

from .config import flat_keys
from .errors import HarnessError, run_entry_point
from .preemption import read_starts
from .run_dir import read_metrics

ALIKE_IN_A_SWEEP = ("run.dir", "run.name")  # differ between any two runs: not worth a column


def find_runs(folder: Path) -> list[Path]:
    """Every run directory (one holding config.yaml) under folder, folder itself included, in path order."""
    return sorted(config.parent for config in folder.rglob("config.yaml")
                  if not {"checkpoints", "wandb", "eval"} & set(config.relative_to(folder).parts[:-1]))


def _running(run_dir: Path) -> bool:
    try:
        fd = os.open(run_dir / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def status(run_dir: Path) -> str:
    if _running(run_dir):
        return "running"
    if (run_dir / "summary.json").is_file():
        return "finished"
    records = read_starts(run_dir)
    return "stopped" if records and records[-1].get("event") == "stop" else "failed"


def read_run(run_dir: Path, folder: Path) -> dict:
    config = flat_keys(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    rows = read_metrics(run_dir / "metrics.jsonl", up_to_epoch=sys.maxsize)
    return {
        "name": str(run_dir.relative_to(folder)) if run_dir != folder else run_dir.name,
        "config": config,
        "rows": rows,
        "best": min((row["val/loss"] for row in rows), default=None),
        "final": rows[-1]["val/loss"] if rows else None,
        "epochs": f"{len(rows)}/{config.get('train.epochs', '?')}",
        "time_s": sum(row.get("epoch_time_s", 0.0) for row in rows),
        "status": status(run_dir),
    }


def differing_keys(runs: list[dict]) -> list[str]:
    keys = sorted({key for run in runs for key in run["config"]} - set(ALIKE_IN_A_SWEEP))
    return [key for key in keys if len({repr(run["config"].get(key)) for run in runs}) > 1]


def print_table(runs: list[dict], keys: list[str], folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs under {folder}", title_justify="left")
    for column in ("run", *keys, "best val/loss", "final val/loss", "epochs", "train time (s)", "status"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right")
    for run in runs:
        numbers = [f"{run[k]:.3f}" if run[k] is not None else "-" for k in ("best", "final")]
        table.add_row(run["name"], *(str(run["config"].get(key, "-")) for key in keys), *numbers, run["epochs"],
                      f"{run['time_s']:.1f}", run["status"])
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: wide enough for the columns


def save_curves(runs: list[dict], keys: list[str], path: Path) -> None:
    from . import plots

    curves = {f"{run['name']}: " + " ".join(f"{key.split('.')[-1]}={run['config'].get(key)}" for key in keys):
              [(row["epoch"], row["val/loss"]) for row in run["rows"]] for run in runs}
    plots.save(plots.val_loss_curves(curves), path)


def report(folder: Path, png: Path | None = None) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"{folder} is not a folder: give the folder that holds the run directories (runs/ or a "
                           f"sweep's folder)")
    runs = [read_run(run_dir, folder) for run_dir in find_runs(folder)]
    if not runs:
        raise HarnessError(f"no run directory under {folder} (a run directory holds config.yaml): give runs/ or a "
                           f"sweep's folder")
    keys = differing_keys(runs)
    print_table(runs, keys, folder)
    png = Path(png) if png else folder / "report.png"
    save_curves(runs, keys, png)
    print(f"wrote {png}")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vae.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder that holds the run directories (runs/, a sweep's)")
    parser.add_argument("--png", type=Path, help="where to write the val/loss curves (default: <folder>/report.png)")
    args = parser.parse_args(argv)
    return run_entry_point(lambda: report(args.folder, args.png), interrupted="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
