"""The IWAE paper's VAE (configs/paper/iwae_vae.yaml), stage by stage, scored as the paper scores it.

    python benchmarks/paper_iwae.py --stages 0-4                 # 121 epochs; each stage's k=5,000 test NLL
    python benchmarks/paper_iwae.py --stages 5-7                 # later: the same run directory goes on
    python benchmarks/paper_iwae.py --stages 0-2 --test-images 1000 --iwae-k 500   # a quick look

Stage i trains at 1e-3 * 10^(-i/7) for 3^i epochs (Burda et al. 2015, section 5): it ends at epoch
(3^(i+1) - 1) / 2, i.e. 1, 4, 13, 40, 121, 364, 1093, 3280. For each stage asked for, this runs
`train.py --config configs/paper/iwae_vae.yaml train.epochs=<its last epoch>` on one run directory (a resume
of the previous stage's, exact as every resume is), keeps that stage's model file as stages/stage_<i>.pt, then
`evaluate.py --iwae-k K` on it (the test NLL in nats on the binarized test set) into
stages/stage_<i>_k<K>_<N or all>.json. A stage whose files exist is not run again: a run stopped anywhere (Ctrl-C,
a time limit) goes on from where it was with the same command. A kept model file is written whole or not at all,
must hold the stage's last epoch (else: one error line), and replaces the stage's earlier scores. Prints one row
per stage beside the paper's final 86.76 nats (Table 1, VAE, k=1, one stochastic layer), and writes them with
--json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vae.storage.checkpoint import load_model_file  # noqa: E402  (the repository on the path)

CONFIG = REPO / "configs" / "paper" / "iwae_vae.yaml"
PAPER_NLL = 86.76  # Burda et al. 2015, Table 1: VAE, one stochastic layer, k = 1 in training, NLL at k = 5,000
LAST_STAGE = 7


def last_epoch(stage: int) -> int:
    return (3 ** (stage + 1) - 1) // 2


def stage_range(text: str) -> range:
    first, _, last = text.partition("-")
    try:
        stages = range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: stages as I or I-J, e.g. 0-4") from None
    if not stages or stages[0] < 0 or stages[-1] > LAST_STAGE:
        raise argparse.ArgumentTypeError(f"{text!r}: stages run from 0 to {LAST_STAGE}, first <= last")
    return stages


def run(command: list[str]) -> float:
    """Runs a child with its output shown; its wall time. A failed child ends the benchmark with its code."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO)
    if result.returncode:
        sys.exit(f"error: {' '.join(command)} exited with {result.returncode}")
    return time.perf_counter() - started


def train_stage(stage: int, run_dir: Path, overrides: list[str]) -> dict:
    """Trains through the stage's last epoch (resuming the run directory) and keeps its model file."""
    stages = run_dir / "stages"
    kept, timing = stages / f"stage_{stage}.pt", stages / f"stage_{stage}_train.json"
    if not kept.exists():
        wall = run([sys.executable, "train.py", "--config", str(CONFIG), f"train.epochs={last_epoch(stage)}",
                    f"run.dir={run_dir}", *overrides])
        epoch = load_model_file(run_dir / "last.pt").get("epoch")
        if epoch != last_epoch(stage):
            sys.exit(f"error: {run_dir / 'last.pt'} holds epoch {epoch}, not stage {stage}'s last epoch "
                     f"{last_epoch(stage)} (stopped early, or the run directory is past this stage): use a new "
                     f"--run-dir for earlier stages")
        stages.mkdir(parents=True, exist_ok=True)
        for stale in stages.glob(f"stage_{stage}_k*.json"):  # scores of an earlier model file of this stage
            stale.unlink()
        timing.write_text(json.dumps({"train_wall_s": wall}))
        shutil.copyfile(run_dir / "last.pt", kept.with_suffix(".pt.tmp"))
        os.replace(kept.with_suffix(".pt.tmp"), kept)  # whole or not at all: a stop here trains the stage again
    return json.loads(timing.read_text()) if timing.exists() else {"train_wall_s": None}


def score_stage(stage: int, run_dir: Path, iwae_k: int, test_images: int | None) -> dict:
    scored = run_dir / "stages" / f"stage_{stage}_k{iwae_k}_{test_images or 'all'}.json"
    if not scored.exists():
        run([sys.executable, "evaluate.py", "--ckpt", str(run_dir / "stages" / f"stage_{stage}.pt"),
             "--iwae-k", str(iwae_k), "--fcd-samples", "0", "--no-figures", "--out", str(scored),
             *(["--test-images", str(test_images)] if test_images else [])])
    return json.loads(scored.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=stage_range, default=stage_range("0-4"), help="I or I-J (0..7)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "iwae_vae")
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=None, help="the first N test images (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="the learning curve against the paper, as a PNG")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. data.root=/data")
    args = parser.parse_args()
    rows = []
    for stage in args.stages:
        trained = train_stage(stage, args.run_dir, args.overrides)
        scores = score_stage(stage, args.run_dir, args.iwae_k, args.test_images)
        if scores.get("checkpoint_epoch") != last_epoch(stage):
            sys.exit(f"error: the scores of stage {stage} are of epoch {scores.get('checkpoint_epoch')}, not "
                     f"{last_epoch(stage)}: delete {args.run_dir / 'stages'}/stage_{stage}_k*.json and run again")
        rows.append({"stage": stage, "epochs": last_epoch(stage), "lr": 1e-3 * 10 ** (-stage / 7), **trained,
                     "nelbo": scores["nelbo"], "iwae_nll": scores["iwae_nll"], "iwae_k": scores["iwae_k"],
                     "test_images": scores["n_images"], "eval_wall_s": scores["wall_time_s"]})
        show(rows, args.iwae_k)
    if args.json:
        args.json.write_text(json.dumps({"paper_nll": PAPER_NLL, "cpu_threads": os.cpu_count(), "rows": rows},
                                        indent=1))
    if args.plot:
        plot_curve(args.run_dir, rows, args.plot)


def show(rows: list[dict], iwae_k: int) -> None:
    table = Table(title=f"configs/paper/iwae_vae.yaml: test NLL (nats, binarized MNIST, IWAE bound k={iwae_k}) "
                        f"against the paper's final {PAPER_NLL}")
    for column in ("stage", "epochs", "lr", "train (s)", "test -ELBO", f"NLL (k={iwae_k})", "test images",
                   "paper, final"):
        table.add_column(column, justify="right")
    for row in rows:
        trained = "?" if row["train_wall_s"] is None else f"{row['train_wall_s']:.0f}"
        table.add_row(str(row["stage"]), str(row["epochs"]), f"{row['lr']:.3g}", trained,
                      f"{row['nelbo']:.2f}", f"{row['iwae_nll']:.2f}", str(row["test_images"]), f"{PAPER_NLL}")
    Console(width=max(110, shutil.get_terminal_size().columns)).print(table)


def plot_curve(run_dir: Path, rows: list[dict], path: Path) -> None:
    """Test -ELBO after every epoch (metrics.jsonl), each stage's IWAE NLL, and the paper's final NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    axes.plot([e["epoch"] for e in epochs], [e["val/loss"] for e in epochs], label="test -ELBO (every epoch)")
    axes.plot([r["epochs"] for r in rows], [r["iwae_nll"] for r in rows], "o-",
              label=f"test NLL, IWAE k={rows[-1]['iwae_k']:,}, {rows[-1]['test_images']:,} test images "
                    "(each stage's end)")
    axes.axhline(PAPER_NLL, color="black", linestyle="--", label=f"the paper, after 3,280 epochs: {PAPER_NLL}")
    axes.set(xscale="log", xlabel="epoch (log scale; stage i ends at (3^(i+1) - 1) / 2)", ylabel="nats per image",
             title="configs/paper/iwae_vae.yaml on binarized MNIST", ylim=(80, 135))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
