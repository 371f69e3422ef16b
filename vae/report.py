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
from datetime import datetime
from pathlib import Path

import yaml

from .cluster.preemption import read_starts
from .cluster.run_dir import is_a_run, read_metrics
from .config import flat_keys
from .errors import HarnessError, first_line, run_entry_point

ALIKE_IN_A_SWEEP = ("run.dir", "run.name")  # differ between any two runs: not worth a column


def find_runs(folder: Path) -> list[Path]:
    """Every run directory (one holding config.yaml and marked as a run, vae.cluster.run_dir.is_a_run) under folder,
    folder itself included, in path order."""
    return sorted(config.parent for config in folder.rglob("config.yaml")
                  if not {"checkpoints", "wandb", "eval"} & set(config.relative_to(folder).parts[:-1])
                  and is_a_run(config.parent))


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
    except OSError:  # a file system without flock (run.lock=false there): cannot tell
        return False
    finally:
        os.close(fd)


def status(run_dir: Path) -> str:
    """From the run's newest event: its last start or stop (starts.jsonl), or its finish (summary.json, written
    at the end): a finished run resumed and stopped again is "stopped", not "finished"."""
    if _running(run_dir):
        return "running"
    records = read_starts(run_dir)
    last = records[-1] if records else {}
    if last.get("event") == "stop":
        return "stopped"
    summary = run_dir / "summary.json"
    if summary.is_file() and (not last or _finished_after(summary, last.get("time"))):
        return "finished"
    return "failed"


def _finished_after(summary: Path, started: str | None) -> bool:
    try:
        start = datetime.strptime(str(started), "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return True  # a start without a readable time: the summary decides, as before starts.jsonl existed
    return summary.stat().st_mtime >= start - 1  # the record's time is cut to the second


def read_run(run_dir: Path, folder: Path) -> dict | None:
    """The run's config, rows and status; None when its config.yaml is not a run's (said on stderr)."""
    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        loaded = e
    if not isinstance(loaded, dict):
        why = first_line(loaded) if isinstance(loaded, Exception) else "not a mapping of sections"
        print(f"skipped {run_dir}: its config.yaml is not a run's ({why})", file=sys.stderr)
        return None
    config = flat_keys(loaded)
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
    from .figures import plots

    curves = {f"{run['name']}: " + " ".join(f"{key.split('.')[-1]}={run['config'].get(key)}" for key in keys):
              [(row["epoch"], row["val/loss"]) for row in run["rows"]] for run in runs}
    plots.save(plots.val_loss_curves(curves), path)


def report(folder: Path, png: Path | None = None) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"{folder} is not a folder: give the folder that holds the run directories (runs/ or a "
                           f"sweep's folder)")
    runs = [run for run in (read_run(run_dir, folder) for run_dir in find_runs(folder)) if run is not None]
    if not runs:
        raise HarnessError(f"no run directory under {folder} (a run directory holds config.yaml and .vae-run): "
                           f"give runs/ or a sweep's folder")
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
