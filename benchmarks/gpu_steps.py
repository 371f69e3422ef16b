"""What each step of the GPU check runs: the environment and MNIST (benchmarks/gpu_environment.py), the GPU tests,
the benchmarks and the whole training runs (configs/z2.yaml and z20.yaml in their variants, two ranks on one GPU).
benchmarks/gpu_check.py holds the plan (the order, the caps, the deadline) and calls these; each takes the running
check (gpu_check.Check: its report, its --out folder, its `run` under the step's time limit) and returns the step's
status and detail.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from gpu_commands import error_line
from gpu_environment import DATA_ROOT, environment_facts, prepare_mnist
from gpu_results import command_verdict, read_run, tests_verdict

REPO = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------------------------
# The steps, in the plan's order (gpu_check.PLAN)


def environment(check) -> tuple[str, str]:
    env = check.report["environment"] = environment_facts()
    check.torch = not str(env["torch"]).startswith("not importable")
    check.cuda = bool(env["CUDA available"])
    check.gpu_machine = check.cuda or env["nvidia-smi (name, driver, memory)"] != "not found"
    if check.gpu_machine and not check.cuda:
        return "failed", "nvidia-smi sees a GPU but torch cannot use it (see torch and torch CUDA build)"
    if not check.torch:
        return "passed", "torch not importable: every later step is skipped"
    return "passed", env["torch.cuda.get_device_name"] if check.cuda else "no CUDA: the GPU steps will be skipped"


def mnist(check) -> tuple[str, str]:
    status, detail = prepare_mnist(check.tgz)
    check.mnist = status == "passed"
    return status, detail


def gpu_tests(check) -> tuple[str, str]:
    if not (REPO / "tests" / "test_gpu.py").is_file():
        return ("failed" if check.cuda else "skipped"), "tests/test_gpu.py is not in this checkout"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-rA",
           f"--junitxml={check.out / 'gpu-tests.xml'}", "-p", "no:cacheprovider"]
    if check.cuda and importlib.util.find_spec("xdist") is not None:
        # Tests side by side; loadgroup keeps the tests that read one module fixture's training on one worker
        # (their xdist_group), which then trains it once. Without CUDA the file skips whole: no workers.
        cmd += ["-n", str(pytest_workers()), "--dist=loadgroup"]
    outcome = check.run(cmd, "gpu-tests.log", {"VAE_REQUIRE_GPU": "1"} if check.cuda else None)
    check.collect_files()
    return tests_verdict(outcome, check.report["tests"], check.cuda)


def z2_default(check) -> tuple[str, str]:
    """As users type it, figures included (W&B off: wandb is not needed on the GPU machine)."""
    return whole_run(check, "z2 default", "configs/z2.yaml", [], launch_flags=[])


def throughput(check) -> tuple[str, str]:
    cmd = [sys.executable, "benchmarks/throughput.py", "--device", "cuda", "--json",
           str(check.out / "throughput.json"), "--data-root", DATA_ROOT]
    outcome = check.run(cmd, "throughput.log")
    check.collect_files()
    return command_verdict(outcome, "all batch sizes measured")


def step_profile(check) -> tuple[str, str]:
    cmd = [sys.executable, "benchmarks/gpu_step_profile.py", "--json", str(check.out / "step-profile.json"),
           "--data-root", DATA_ROOT, "--steps", "1000", "--variants", *PROFILED]
    outcome = check.run(cmd, "throughput.log")
    check.collect_files()
    return command_verdict(outcome, f"{', '.join(PROFILED)} profiled")


def ddp(check) -> tuple[str, str]:
    """Two ranks on the one GPU: gloo (NCCL refuses two ranks on one GPU), as docs/gpu.md shows."""
    # port 0: Accelerate picks a free one, as the tests do
    flags = ["--main_process_port", "0", "--multi_gpu", "--num_processes", "2"]
    overrides = ["train.dist_backend=gloo", f"train.epochs={DDP_EPOCHS}", "log.figures=false"]
    status, detail = whole_run(check, "DDP 2 ranks", "configs/z2.yaml", overrides, launch_flags=flags,
                               check_step="DDP on one GPU")
    run = check.report["runs"]["DDP 2 ranks"]
    if status == "passed" and (run["num_processes"], run["dist_backend"]) != (2, "gloo"):
        return "failed", f"ran as {run['num_processes']} process(es) over {run['dist_backend']}, not 2 over gloo"
    return status, detail


# From here figures are off: these runs are compared by their losses and times, and the budget is short.


def _z20(check, precision: str, flag: str) -> tuple[str, str]:
    overrides = [f"train.mixed_precision={flag}", f"train.epochs={Z20_EPOCHS}", "log.figures=false"]
    return whole_run(check, f"z20 {precision}", "configs/z20.yaml", overrides)


def z20_fp32(check) -> tuple[str, str]:
    return _z20(check, "fp32", "no")  # the precisions' reference


def z20_bf16(check) -> tuple[str, str]:
    return _z20(check, "bf16", "bf16")


def tf32(check) -> tuple[str, str]:
    """configs/z20.yaml at batch 1024, where the matrix products are large enough for TF32 to matter."""
    common = ["train.batch_size=1024", f"train.epochs={TF32_EPOCHS}", "log.figures=false"]
    half = (check.step_deadline - time.monotonic()) / 2
    for setting, keep_s in (("off", half), ("on", 0)):
        flag = "true" if setting == "on" else "false"
        status, detail = whole_run(check, f"TF32 {setting}", "configs/z20.yaml", [*common, f"train.tf32={flag}"],
                                   keep_s=keep_s, check_step="TF32 at batch 1024")
        if status != "passed":
            return status, f"train.tf32={flag}: {detail}"
    off, on = check.report["runs"]["TF32 off"], check.report["runs"]["TF32 on"]
    if not (off.get("samples_per_s") and on.get("samples_per_s")):
        return "failed", "a run finished without a second epoch to time"
    return "passed", (f"{on['samples_per_s']:,.0f} against {off['samples_per_s']:,.0f} train samples/s; "
                      f"val/loss {on['val_loss'] - off['val_loss']:+.3f} nats")


def z2_eager(check) -> tuple[str, str]:
    return whole_run(check, "z2 eager", "configs/z2.yaml", [
        "train.cuda_graph=false", f"train.epochs={EAGER_EPOCHS}", "log.figures=false"])


def z20_fp16(check) -> tuple[str, str]:
    return _z20(check, "fp16", "fp16")


def z2_deterministic(check) -> tuple[str, str]:
    return whole_run(check, "z2 deterministic", "configs/z2.yaml", ["train.deterministic=true", "log.figures=false"])


# ---------------------------------------------------------------------------------------------------------
# A whole training run: train.py in a subprocess, its run directory read into report["runs"]


def whole_run(check, name: str, config: str, overrides: list[str], launch_flags: list[str] | None = None,
              keep_s: float = 0, check_step: str | None = None) -> tuple[str, str]:
    """train.py on `config`, W&B off (wandb is not needed here); started by `accelerate launch` with
    launch_flags where they are given (also []), else by python itself."""
    run_dir = check.tmp / name.replace(" ", "-")
    args = ["train.py", "--config", config, "log.wandb=false", *overrides]
    where = [f"run.dir={run_dir}", f"data.root={DATA_ROOT}"]
    launcher = [sys.executable] if launch_flags is None else [*accelerate_launch(), *launch_flags]
    outcome = check.run([*launcher, *args, *where], "runs.log", keep_s=keep_s)
    shown = ["python"] if launch_flags is None else ["accelerate", "launch", *launch_flags]
    run = check.report["runs"][name] = {"config": config, "overrides": overrides, "command": " ".join(shown + args),
                                        "check_step": check_step or name, "process_s": outcome.seconds,
                                        **read_run(run_dir)}
    _compare_to_fp32(check.report["runs"], name, run)
    if outcome.rc not in (0, None) and "unknown key" in outcome.text:
        return "not available", f"not a config key in this checkout: {error_line(outcome.text)}"
    loss = f"val/loss {run['val_loss']:.3f}, " if run["val_loss"] is not None else ""
    time_s = f"training {run['train_time_s']:.2f} s" if run["train_time_s"] is not None else "no epoch finished"
    return command_verdict(outcome, f"{loss}{time_s}, whole {outcome.seconds:.1f} s")


def _compare_to_fp32(runs: dict, name: str, run: dict) -> None:
    """Only runs that finished compare: a loss after fewer epochs says nothing about precision."""
    fp32 = runs.get("z20 fp32", {})
    if name in ("z20 bf16", "z20 fp16") and fp32.get("epochs") == run["epochs"] == Z20_EPOCHS:
        run["delta_to_fp32"] = run["val_loss"] - fp32["val_loss"]
