"""End to end: the classic tutorial's script against the harness's real command, as whole processes.

    python benchmarks/end_to_end.py                                 # 3 pairs at 20 epochs (the tutorial's config)
    python benchmarks/end_to_end.py --epochs 1 --pairs 1            # a quick check
    python benchmarks/end_to_end.py --variants no-wandb --json e2e.json

Per pair, one run of each, in a fresh temporary directory each (order A, B... in even pairs, reversed in odd
ones, so that a machine drifting in speed does not favour one side):

- A (tutorial): `python benchmarks/tutorial_script.py --epochs E` (torchvision MNIST + ToTensor, DataLoader at
  batch 50, the example's model, loop, log lines, test pass and PNGs; its last line reports its own timings).
- B (harness): `<venv>/bin/accelerate launch train.py --config configs/z2.yaml train.epochs=E run.dir=<tmp>`,
  in the variants `defaults` (W&B on; offline, as for a user without a login) and `no-wandb` (log.wandb=false).

Every child runs with WANDB_MODE=offline, WANDB_API_KEY unset, WANDB_CONFIG_DIR in its temporary directory (no
settings of this machine's user, nothing written to the home directory) and PYTHONUNBUFFERED=1 (its output
arrives line by line, as at a terminal, so that the line timestamps below are exact).

What is measured, all in seconds from just before Popen ("launch"):

- wall: launch to the process's exit, measured here.
- epoch 1 starts: tutorial: its own time.time() on entering epoch 1's loop (before the first batch is loaded).
  Harness: the moment its "epoch 1" line arrives here minus the epoch_time_s it wrote for epoch 1 to
  metrics.jsonl, i.e. when its epoch timer started, just before the first batch. Everything before it (the
  interpreter, imports, `accelerate launch` starting train.py, reading MNIST, the model, wandb's import) is
  "start-up". W&B's service and wandb.init run in a thread of their own during epoch 1: their CPU time lands in
  epoch 1's training, and the loop's wait for them at the end of epoch 1 (summary.json `wandb_start_wait_s`,
  shown below) in "between epochs" ("end" with --epochs 1).
- start-up, phase by phase (they add up to "epoch 1 starts"). Tutorial, by its own clock: Python's start (launch
  to its first line), its imports, then data and model. Harness: the phases of summary.json's `startup_s`, timed
  by the training itself from its process's start ("imports": the interpreter, train.py's imports and the config,
  then accelerator, data, model, ..., tracker), after "accelerate launch, until train.py's process starts" (epoch
  1's start less startup_s's total). A harness that writes no startup_s is split at the arrival of `accelerate
  launch`'s warning about defaults (printed where no accelerate config exists, when the launcher has imported
  torch and starts train.py) and of the harness's "run directory ..." line (MNIST read, model built).
- first training step: the tutorial's own time.time() after its first optimizer.step(). The harness records no
  such time; for it only "epoch 1 starts" is given.
- training: the tutorial's timed train() calls (60,000 images incl. its per-step loss.item() and log lines);
  the harness's train time per epoch = images / samples_per_s of metrics.jsonl (its own epoch timer).
- test passes: tutorial: its timed test() calls (10,000 images, batch 50, with the reconstruction PNG of the
  example); harness: epoch_time_s - train time (the test pass, batch 1000).
- between epochs: from the end of one epoch's test pass to the start of the next. Tutorial: the sample PNG and
  prints. Harness: metrics row, last.pt/best.pt, the full checkpoint, W&B logging (with its figures every epoch).
- end: after the last test pass until the exit. Harness, split by the mtimes of its files: the last epoch's
  after-work to the newest checkpoints/*/trainer_state.json, then to summary.json (final PNG figures), then to the
  exit (summary table, W&B's finish, process shutdown, the launcher's exit).

The parts add up to the wall time of each run. The tables show medians over the pairs (medians of the parts need
not add up exactly); --json writes every raw number (per run: markers, breakdown, startup_source and
startup_phases), with each run's output lines and their arrival times. Nothing here depends on the device: the
tutorial's script uses CUDA where there is a GPU, and so does the harness (`--override train.cpu=true` keeps it on
the CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = "tutorial"
VARIANTS = {"defaults": [], "no-wandb": ["log.wandb=false"]}
RUN_DIR_LINE = re.compile(r"run directory .*\| (\d+) train / (\d+) test images")
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)\s+train/loss")
WANDB_LINE = re.compile(r"^W&B run ")
LAUNCHER_LINE = re.compile(r"were not passed to `accelerate launch`")  # its warning where no accelerate config

console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


# ---------------------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "torchvision", "accelerate", "wandb"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), **versions, "load_average": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------------
# Running one process


def child_env(tmp: Path) -> dict:
    env = dict(os.environ)
    for name in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        env.pop(name, None)
    env.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp / "wandb-config"), PYTHONUNBUFFERED="1")
    return env


def run_process(cmd: list[str], tmp: Path) -> dict:
    """Run cmd from the repository root; every output line (stdout and stderr) with its arrival time."""
    lines: list[tuple[float, str]] = []
    launched_at = time.time()
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for raw in proc.stdout:
            arrived = time.perf_counter() - launched
            for part in raw.decode(errors="replace").rstrip("\r\n").split("\r"):
                if part.strip():
                    lines.append((arrived, part))
        returncode = proc.wait()
        wall = time.perf_counter() - launched
    finally:
        if proc.poll() is None:  # interrupted: stop the child and whatever it started (its own session)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    return {"cmd": cmd, "returncode": returncode, "launched_at": launched_at, "wall_s": wall, "lines": lines}


def fail(run: dict, why: str, tmp: Path) -> None:
    console.print(f"[bold red]{' '.join(run['cmd'])}: {why}[/bold red] (its directory is kept: {tmp})")
    for _, line in run["lines"][-40:]:
        console.print(line, markup=False)
    sys.exit(1)


def first_line_time(lines: list[tuple[float, str]], pattern: re.Pattern) -> float | None:
    return next((t for t, line in lines if pattern.search(line)), None)


# ---------------------------------------------------------------------------------------------------------
# A: the tutorial's script


def run_tutorial(args, tmp: Path) -> dict:
    cmd = [sys.executable, "benchmarks/tutorial_script.py", "--epochs", str(args.epochs),
           "--data-root", str(args.data_root), "--results-dir", str(tmp / "results")]
    run = run_process(cmd, tmp)
    timings_lines = [line for _, line in run["lines"] if line.startswith("TIMINGS ")]
    if run["returncode"] != 0 or not timings_lines:
        fail(run, f"exit status {run['returncode']}" + ("" if timings_lines else ", no TIMINGS line"), tmp)
    child = json.loads(timings_lines[-1][len("TIMINGS "):])
    at = run["launched_at"]
    wall, starts = run["wall_s"], [t - at for t in child["epoch_started_at"]]
    train_s, test_s = child["train_s"], child["test_s"]
    ends = [start + train + test for start, train, test in zip(starts, train_s, test_s, strict=True)]
    run.update(
        child_timings=child,
        markers={
            "python_started": child["started_at"] - at,
            "imports_done": child["imported_at"] - at,
            "epoch1_start": starts[0],
            "first_step": child["first_step_at"] - at,
            "first_log_line_arrived": first_line_time(run["lines"], re.compile(r"^Train Epoch: 1 ")),
            "finished": child["finished_at"] - at,
        },
        epochs=[{"epoch": k + 1, "start": starts[k], "train_s": train_s[k], "test_s": test_s[k],
                 "train_samples_per_s": child["train_images"] / train_s[k], "train_loss": child["train_loss"][k],
                 "test_loss": child["test_loss"][k]} for k in range(len(starts))],
        final_test_loss=child["test_loss"][-1],
        startup_source="its own clock",
        startup_phases={
            "python's start (tutorial)": child["started_at"] - at,
            "imports (tutorial)": child["imported_at"] - child["started_at"],
            "data, model (tutorial)": starts[0] - (child["imported_at"] - at),
        },
        breakdown={
            "start-up": starts[0],
            "training": sum(train_s),
            "test passes": sum(test_s),
            "between epochs": sum(starts[k + 1] - ends[k] for k in range(len(starts) - 1)),
            "end: last epoch's sample PNG, exit": wall - ends[-1],
        },
    )
    return run


# ---------------------------------------------------------------------------------------------------------
# B: the harness's command


def run_harness(args, variant: str, tmp: Path) -> dict:
    accelerate = Path(sys.executable).parent / "accelerate"
    run_dir = tmp / "run"
    cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "train.py", "--config",
           "configs/z2.yaml", f"train.epochs={args.epochs}", f"run.dir={run_dir}", *VARIANTS[variant],
           *args.override]
    run = run_process(cmd, tmp)
    if run["returncode"] != 0:
        fail(run, f"exit status {run['returncode']}", tmp)
    at, wall, lines = run["launched_at"], run["wall_s"], run["lines"]
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((run_dir / "summary.json").read_text())
        summary_written = (run_dir / "summary.json").stat().st_mtime - at
        states = sorted((run_dir / "checkpoints").glob("*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
        last_state_written = states[-1].stat().st_mtime - at
    except (OSError, ValueError, IndexError) as error:
        fail(run, f"its run directory lacks what is read here: {error}", tmp)
    run_dir_match = next((m for _, line in lines if (m := RUN_DIR_LINE.search(line))), None)
    epoch_lines = {int(m.group(1)): t for t, line in lines if (m := EPOCH_LINE.match(line))}
    if run_dir_match is None or sorted(epoch_lines) != [row["epoch"] for row in rows]:
        fail(run, "its 'run directory' line or its epoch lines were not found", tmp)
    train_images = int(run_dir_match.group(1))
    epochs = []
    for row in rows:
        line_at = epoch_lines[row["epoch"]]
        train = train_images / row["samples_per_s"]
        epochs.append({"epoch": row["epoch"], "start": line_at - row["epoch_time_s"], "line_arrived": line_at,
                       "train_s": train, "test_s": row["epoch_time_s"] - train,
                       "train_samples_per_s": row["samples_per_s"], "train_loss": row["train/loss"],
                       "test_loss": row["val/loss"], "metrics_row": row})
    starts, lines_at = [e["start"] for e in epochs], [e["line_arrived"] for e in epochs]
    source, phases = harness_startup(summary, lines, starts[0])
    run.update(
        metrics=rows,
        summary=summary,
        markers={
            "launcher_warning_line": first_line_time(lines, LAUNCHER_LINE),
            "run_directory_line": first_line_time(lines, RUN_DIR_LINE),
            "wandb_line": first_line_time(lines, WANDB_LINE),
            "epoch1_start": starts[0],
            "last_checkpoint_written": last_state_written,
            "summary_written": summary_written,
            "harness_wall_time_s": summary["wall_time_s"],
            "wandb_start_wait_s": summary.get("wandb_start_wait_s"),
        },
        epochs=epochs,
        final_test_loss=summary["val/loss"],
        startup_source=source,
        startup_phases=phases,
        breakdown={
            "start-up": starts[0],
            "training": sum(e["train_s"] for e in epochs),
            "test passes": sum(e["test_s"] for e in epochs),
            "between epochs": sum(starts[k + 1] - lines_at[k] for k in range(len(epochs) - 1)),
            "end: last epoch's files, checkpoint, W&B": last_state_written - lines_at[-1],
            "end: final figures, summary.json": summary_written - last_state_written,
            "end: W&B finish, shutdown, exit": wall - summary_written,
        },
    )
    return run


def harness_startup(summary: dict, lines: list[tuple[float, str]], epoch1_start: float) -> tuple[str, dict]:
    """The harness's start-up, launch to epoch 1, phase by phase: from summary.json's startup_s (the phases the
    training timed itself, from its process's start; before them, `accelerate launch` until it started train.py),
    else split at the arrival of two output lines. The phases add up to epoch 1's start."""
    startup = summary.get("startup_s")
    if isinstance(startup, dict) and isinstance(startup.get("total"), (int, float)):
        phases = {"accelerate launch, until train.py's process starts": epoch1_start - startup["total"]}
        phases.update({f"train.py: {name}": value for name, value in startup.items()
                       if name != "total" and isinstance(value, (int, float))})
        return "summary.json startup_s", phases
    warning, run_dir_line = first_line_time(lines, LAUNCHER_LINE), first_line_time(lines, RUN_DIR_LINE)
    phases, before = {}, 0.0
    if warning is not None:  # printed where no accelerate config exists, as the launcher starts train.py
        phases["to the launcher's warning line (its imports)"] = before = warning
    phases["to the 'run directory' line (imports, accelerator, MNIST, model)"] = run_dir_line - before
    phases["to epoch 1 (W&B, TensorBoard, the loop's start)"] = epoch1_start - run_dir_line
    return "output lines", phases


# ---------------------------------------------------------------------------------------------------------
# Leftovers: a run must write only into its temporary directory


def watched_places() -> list[Path]:
    home = Path.home()
    return [REPO, REPO / "runs", REPO / "benchmarks", REPO / "data", REPO / "data" / "MNIST",
            home / ".config" / "wandb", home / ".cache" / "wandb", home / ".local" / "share" / "wandb", home / "wandb"]


def snapshot() -> dict[str, list[str] | None]:
    return {str(p): sorted(os.listdir(p)) if p.is_dir() else None for p in watched_places()}


def leftovers(before: dict, after: dict) -> list[str]:
    found = []
    for place, names in after.items():
        if names is not None and before[place] is None:
            found.append(f"{place} (created)")
        elif names is not None:
            found += [f"{place}/{name}" for name in names if name not in before[place]]
    return found


# ---------------------------------------------------------------------------------------------------------
# Reporting


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def run_line(run: dict) -> str:
    parts = " | ".join(f"{name} {value:.1f}" for name, value in run["breakdown"].items())
    load = "/".join(f"{x:.1f}" for x in (run["load_average_before"][0], run["load_average_after"][0]))
    return f"pair {run['pair']} {run['name']:>9}: wall {run['wall_s']:.1f} s = {parts} | test loss " \
           f"{run['final_test_loss']:.2f} | load avg before/after {load}"


def variant_summary(runs: list[dict], variant: str) -> dict:
    a_runs = [r for r in runs if r["name"] == TUTORIAL]
    b_runs = [r for r in runs if r["name"] == variant]
    ratios = [a["wall_s"] / b["wall_s"] for a in a_runs for b in b_runs if a["pair"] == b["pair"]]

    def side(side_runs: list[dict]) -> dict:
        return {
            "wall_s": median(r["wall_s"] for r in side_runs),
            "markers": {k: median(r["markers"].get(k) for r in side_runs) for k in side_runs[0]["markers"]},
            "breakdown": {k: median(r["breakdown"][k] for r in side_runs) for k in side_runs[0]["breakdown"]},
            "startup_source": sorted({r["startup_source"] for r in side_runs}),
            "startup_phases": {k: median(r["startup_phases"].get(k) for r in side_runs)
                               for k in dict.fromkeys(k for r in side_runs for k in r["startup_phases"])},
            "train_samples_per_s_median_epoch": median(
                median(e["train_samples_per_s"] for e in r["epochs"]) for r in side_runs),
            "train_samples_per_s_epoch1": median(r["epochs"][0]["train_samples_per_s"] for r in side_runs),
            "final_test_loss": median(r["final_test_loss"] for r in side_runs),
        }

    return {"variant": variant, "pair_ratios_A_over_B": ratios, "median_ratio_A_over_B": median(ratios),
            "tutorial": side(a_runs), "harness": side(b_runs)}


def variant_table(summary: dict, epochs: int, pairs: int) -> Table:
    a, b = summary["tutorial"], summary["harness"]
    table = Table(title=f"harness ({summary['variant']}) vs tutorial: {epochs} epoch(s), median of {pairs} pair(s), "
                        f"seconds unless stated", title_justify="left")
    table.add_column("")
    table.add_column("A: tutorial", justify="right")
    table.add_column(f"B: harness, {summary['variant']}", justify="right")
    table.add_column("harness x", justify="right")

    def row(label: str, a_value, b_value, digits: int = 1, faster: str = "") -> None:
        """faster: "time" (shows A/B) or "speed" (shows B/A): how many times faster the harness is."""
        shown = ""
        if faster and a_value and b_value:
            shown = fmt(a_value / b_value if faster == "time" else b_value / a_value, 2)
        table.add_row(label, fmt(a_value, digits), fmt(b_value, digits), shown)

    table.add_row("[bold]wall time, launch to exit[/bold]", fmt(a["wall_s"]), fmt(b["wall_s"]),
                  f"[bold]{fmt(summary['median_ratio_A_over_B'], 2)}[/bold] (median A/B of the pairs)")
    row("epoch 1 starts (since launch)", a["markers"]["epoch1_start"], b["markers"]["epoch1_start"], 2, "time")
    row("  tutorial: imports done", a["markers"]["imports_done"], None, 2)
    if b["markers"]["launcher_warning_line"] is not None:
        row("  harness: launcher's warning line", None, b["markers"]["launcher_warning_line"], 2)
    row("  harness: 'run directory' line", None, b["markers"]["run_directory_line"], 2)
    if b["markers"]["wandb_line"] is not None:
        row("  harness: 'W&B run' line (W&B ready)", None, b["markers"]["wandb_line"], 2)
    if b["markers"].get("wandb_start_wait_s") is not None:
        row("  harness: waited for W&B's start (epoch 1's end)", None, b["markers"]["wandb_start_wait_s"], 2)
    row("first step done (tutorial's clock)", a["markers"]["first_step"], None, 2)
    row("train img/s, median epoch", a["train_samples_per_s_median_epoch"],
        b["train_samples_per_s_median_epoch"], 0, "speed")
    row("train img/s, epoch 1", a["train_samples_per_s_epoch1"], b["train_samples_per_s_epoch1"], 0, "speed")
    row("harness's wall_time_s (summary.json)", None, b["markers"]["harness_wall_time_s"])
    table.add_section()
    for key in dict.fromkeys([*a["breakdown"], *b["breakdown"]]):
        a_value, b_value = a["breakdown"].get(key), b["breakdown"].get(key)
        row(key, a_value, b_value, 1, "time" if key in ("start-up", "training", "test passes") else "")
    table.add_section()
    table.add_row(f"[bold]start-up, phase by phase[/bold] (tutorial: {', '.join(a['startup_source'])}; harness: "
                  f"{', '.join(b['startup_source'])})", "", "", "")
    for key, value in a["startup_phases"].items():
        row(f"  {key}", value, None, 2)
    for key, value in b["startup_phases"].items():
        row(f"  {key}", None, value, 2)
    table.add_section()
    row("final test loss (nats/image)", a["final_test_loss"], b["final_test_loss"], 2)
    return table


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description="Tutorial script vs the harness's command, whole processes.")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20, the tutorial's)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs (default: 3)")
    parser.add_argument("--variants", default="defaults,no-wandb",
                        help=f"harness variants, comma-separated, of {', '.join(VARIANTS)} (default: both)")
    parser.add_argument("--data-root", type=Path, default=REPO / "data",
                        help="the tutorial's MNIST root (default: the repository's data/, which the harness reads)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the harness's command, e.g. train.cpu=true (repeatable)")
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's temporary directory")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or args.epochs < 1 or args.pairs < 1:
        parser.error(f"--variants takes {', '.join(VARIANTS)}; --epochs and --pairs >= 1")

    machine = machine_info()
    console.print(f"[bold]{machine['cpu']}[/bold] | {machine['cpu_count']} cores ({machine['usable_cpus']} usable) | "
                  f"torch {machine['torch']} | torchvision {machine['torchvision']} | accelerate "
                  f"{machine['accelerate']} | wandb {machine['wandb']} | Python {machine['python']} | load average "
                  f"{' '.join(f'{x:.2f}' for x in machine['load_average'])}")
    console.print(f"{args.pairs} pair(s) x (tutorial + harness {', '.join(variants)}) at {args.epochs} epoch(s)")

    before = snapshot()
    runs: list[dict] = []
    names = [TUTORIAL, *variants]
    for pair in range(args.pairs):
        for position, name in enumerate(names if pair % 2 == 0 else names[::-1]):
            tmp = Path(tempfile.mkdtemp(prefix=f"e2e-{name}-"))
            load_before = os.getloadavg()
            run = run_tutorial(args, tmp) if name == TUTORIAL else run_harness(args, name, tmp)
            run.update(pair=pair, position=position, name=name, tmp=str(tmp), load_average_before=load_before,
                       load_average_after=os.getloadavg())
            runs.append(run)
            console.print(run_line(run), markup=False)
            if not args.keep_runs:
                shutil.rmtree(tmp, ignore_errors=True)
    left = leftovers(before, snapshot())

    summaries = [variant_summary(runs, variant) for variant in variants]
    for summary in summaries:
        console.print()
        console.print(variant_table(summary, args.epochs, args.pairs))
    console.print("harness x: how many times faster the harness is (times: A/B, speeds: B/A). Medians per row; the "
                  "parts of one run add up to its wall time; benchmarks/end_to_end.py's docstring says what each row "
                  "measures. On a machine shared with other work, compare the load averages of the runs above.")
    if left:
        console.print(f"[bold red]left behind outside the temporary directories:[/bold red] {', '.join(left)}")
    else:
        console.print("nothing was left behind outside the temporary directories (repository, runs/, data/, "
                      "~/.config/wandb, ~/.cache/wandb checked)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {**vars(args), "json": str(args.json),
                                                                      "data_root": str(args.data_root)},
                                         "summaries": summaries, "runs": runs, "left_behind": left}, indent=1))
        console.print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
