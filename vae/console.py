"""Everything the harness prints: rich progress bars, per-epoch lines, tables. Silent on non-main processes."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RunConsole:
    """Prints only when `enabled` (the main process); every method is a no-op elsewhere."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True) if enabled else None

    def print(self, *objects) -> None:
        if self.enabled:
            self.console.print(*objects)

    def info(self, message: str) -> None:
        self.print(f"[dim]{message}[/dim]")

    def warn(self, message: str) -> None:
        self.print(f"[bold yellow]warning:[/bold yellow] {message}")

    @contextlib.contextmanager
    def epoch_progress(self, epoch: int, epochs: int, steps: int) -> Iterator[EpochBar]:
        if not self.enabled:
            yield EpochBar(None, None)
            return
        progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        with progress:
            task = progress.add_task("train", total=steps, loss="")
            yield EpochBar(progress, task)

    def epoch_line(self, row: dict) -> None:
        self.print(
            f"epoch {row['epoch']:>3}  train/loss {row['train/loss']:8.3f}  val/loss {row['val/loss']:8.3f}  "
            f"val/recon {row['val/recon']:8.3f}  val/kl {row['val/kl']:6.3f}  "
            + (f"val_ema/loss {row['val_ema/loss']:8.3f}  " if "val_ema/loss" in row else "") +
            f"{row['samples_per_s']:9.0f} samples/s  {row['epoch_time_s']:5.1f} s"
            + (f"  data wait {row['data_wait_share']:.1%}  peak {max(row['peak_memory_mb_per_rank']):.0f} MB"
               if "data_wait_share" in row else "")
        )

    def summary_table(self, title: str, values: dict) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("key", style="bold")
        table.add_column("value", justify="right")
        for key, value in values.items():
            table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
        self.console.print(table)


class EpochBar:
    def __init__(self, progress: Progress | None, task):
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=steps)

    def show_loss(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, loss=f"loss {loss:.2f}")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: ...; usage: ...`) instead of a usage block."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")  # argparse wraps a long usage
        self.exit(2, f"error: {message}; usage: {usage}\n")
