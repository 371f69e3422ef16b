"""The GPU check's report: its targets, computed from whatever report.json holds, and report.md.

Plain Python (no torch), so that a report can be rendered anywhere, also from an older check's report.json
(tests/test_gpu_report.py renders the one in docs/gpu/). benchmarks/gpu_check.py writes both files after every step.
"""

from __future__ import annotations

MAX_NATS = 0.5  # bf16/fp16 final val/loss must lie this close to fp32's
DDP_TESTS = "two_ranks"  # what the names of tests/test_gpu.py's DDP-on-one-GPU tests hold


# ---------------------------------------------------------------------------------------------------------
# Targets (issue 25's, and the check's standing ones)


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
    what, goal = "batch 50: harness / tutorial, train samples/s, same GPU", ">= 25x"
    if not ratios:
        return _target(what, None, goal, False)
    shown = ", ".join(f"{value:.1f}x {name}" for name, value in ratios.items())
    return _target(what, shown, goal, max(ratios.values()) >= 25)


def _rate_target(report: dict) -> dict:
    measured = _by_batch(report, 1024).get("harness_cuda_graph", {})
    rate = measured.get("train_samples_per_s")
    what, goal = "batch 1024: harness CUDA graph, train samples/s", ">= 3,000,000"
    if rate is None and "error" in measured:  # tried and failed: not met
        return {"target": what, "measured": f"failed: {measured['error']}", "goal": goal, "met": "no"}
    return _target(what, None if rate is None else f"{rate:,.0f}", goal, rate is not None and rate >= 3_000_000)


def _z2_graph_run(report: dict) -> str:
    """The 20-epoch z2 run with the CUDA graph: the default command since train.cuda_graph=auto; checks made before
    that ran it with train.cuda_graph=true as "z2 CUDA graph"."""
    return next((name for name in ("z2 default", "z2 CUDA graph") if name in report["runs"]), "z2 default")


def _finished_z2(report: dict, name: str) -> dict | None:
    row = report["runs"].get(name, {})
    return row if row.get("epochs") == 20 and row.get("train_time_s") is not None else None


def _whole_command_target(report: dict) -> dict:
    row = _finished_z2(report, "z2 default")
    return _target("z2 default: `accelerate launch train.py --config configs/z2.yaml`, W&B off, whole command",
                   f"{row['process_s']:.1f} s" if row else None, "<= 15 s", row and row["process_s"] <= 15)


def _z2_training_target(report: dict) -> dict:
    name = _z2_graph_run(report)
    row = _finished_z2(report, name)
    return _target(f"{name}: 20 epochs, training wall time (sum of epoch times)",
                   f"{row['train_time_s']:.2f} s" if row else None, "<= 5 s", row and row["train_time_s"] <= 5)


def _profile_rows(report: dict) -> list[dict]:
    """The step profile's measured rows (a variant that failed has its error instead)."""
    return [r for r in (report.get("step_profile") or {}).get("rows", []) if "error" not in r]


def _variant(row: dict) -> str:
    return row.get("variant", "graph" if row.get("cuda_graph") else "eager")  # older profiles had no variant


def _graph_step_target(report: dict) -> dict:
    row = next((r for r in _profile_rows(report) if r["batch_size"] == 50 and _variant(r) == "graph"), None)
    return _target("graph step at batch 50: wall time per step (benchmarks/gpu_step_profile.py)",
                   f"{row['wall_us_per_step']:.0f} us" if row else None, "<= 170 us",
                   row and row["wall_us_per_step"] <= 170)


def _kernel_target(report: dict) -> dict:
    rows = [r for r in _profile_rows(report) if _variant(r) == "graph"]
    worst = max(rows, key=lambda r: r["wall_over_kernel"], default=None)
    shown = ", ".join(f"batch {r['batch_size']}: {r['wall_over_kernel']:.2f}x" for r in rows)
    return _target("CUDA graph: wall time per step / kernel time per step (torch.profiler)", shown or None,
                   "<= 2x", worst is not None and worst["wall_over_kernel"] <= 2)


def _precision_target(report: dict, run: str) -> dict:
    delta = report["runs"].get(run, {}).get("delta_to_fp32")
    return _target(f"{run}: final val/loss minus fp32's", None if delta is None else f"{delta:+.3f} nats",
                   f"within {MAX_NATS} nats", delta is not None and abs(delta) <= MAX_NATS)


def _ddp_target(report: dict) -> dict:
    tests = [t for t in report.get("tests", []) if DDP_TESTS in t["name"]]
    counts = {result: sum(t["result"] == result for t in tests) for result in ("passed", "failed", "skipped")}
    shown = ", ".join(f"{n} {result}" for result, n in counts.items() if n)
    return _target("2 ranks on one GPU (gloo): train the 1-rank model, stop and resume, evaluate (GPU tests)",
                   shown or None, "every such test passes", counts["passed"] and not counts["failed"])


def targets(report: dict) -> list[dict]:
    return [_whole_command_target(report), _z2_training_target(report), _graph_step_target(report),
            _ratio_target(report), _rate_target(report), _kernel_target(report),
            _precision_target(report, "z20 bf16"), _precision_target(report, "z20 fp16"), _ddp_target(report)]


# ---------------------------------------------------------------------------------------------------------
# The Markdown report


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


def _num(value, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _not_measured(report: dict, step: str) -> list[str]:
    entry = report["steps"].get(step, {"status": "not in this check", "detail": ""})
    return [f"Not measured ({entry['status']}{': ' + entry['detail'] if entry['detail'] else ''}).", ""]


PIPELINES = (("tutorial", "tutorial"), ("harness", "harness"), ("harness_cuda_graph", "harness + CUDA graph"))


def _md_throughput(report: dict) -> list[str]:
    data = report.get("throughput")
    if not data:
        return _not_measured(report, "throughput")
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
        return _not_measured(report, "step profile")
    lines = []
    if "launch" in profile:
        launch = profile["launch"]
        lines += [f"One tiny kernel on this machine: {launch['eager_us_per_tiny_kernel']:.1f} us launched eagerly "
                  f"from Python, {launch['graph_us_per_tiny_kernel']:.2f} us inside a CUDA graph.", ""]
    rows = []
    for r in profile["rows"]:
        if "error" in r:
            rows.append([r["batch_size"], _variant(r), f"failed: {r['error']}", None, None, None, None, None])
            continue
        rows.append([r["batch_size"], _variant(r), f"{r['wall_us_per_step']:.1f}", f"{r['kernel_us_per_step']:.1f}",
                     _num(r["wall_over_kernel"], ".2f"), _num(r.get("device_ops_per_step"), ".0f"),
                     f"{r['train_samples_per_s']:,.0f}", _num(r.get("warmup_s"), ".1f")])
    lines += _table(["batch", "step", "wall us/step", "kernel us/step", "wall / kernel", "device ops/step",
                     "train samples/s", "warm-up s"], rows)
    for r in (r for r in profile["rows"] if r.get("top_kernels")):
        lines += [f"Costliest device operations, batch {r['batch_size']}, {r['variant']}:", ""]
        lines += _table(["operation", "us/step", "per step"],
                        [[k["name"], f"{k['us_per_step']:.1f}", f"{k['per_step']:.1f}"] for k in r["top_kernels"]])
    return lines


def _step_kind(run: dict) -> str | None:
    """The training step the run's first line named (environment.json's step), without the 'step: ' prefix."""
    return None if run.get("step") is None else str(run["step"]).removeprefix("step: ")


def _md_runs(report: dict) -> list[str]:
    rows = []
    for name, run in report["runs"].items():
        status = report["steps"].get(run.get("check_step", name), {}).get("status")
        delta = run.get("delta_to_fp32")
        verdict = None if delta is None else f"{delta:+.3f} ({'pass' if abs(delta) <= MAX_NATS else 'FAIL'})"
        command = run.get("command") or " ".join(run.get("overrides", [])) or None  # older reports: overrides
        rows.append([name, command, status, _step_kind(run), run.get("epochs"), _num(run.get("val_loss"), ".3f"),
                     verdict, _num(run.get("train_time_s"), ".2f"), _num(run.get("summary_wall_s"), ".2f"),
                     _num(run.get("process_s"), ".1f"), _num(run.get("samples_per_s"), ",.0f")])
    if not rows:
        return ["No run finished an epoch.", ""]
    return _table(["run", "command / overrides", "status", "step", "epochs", "val/loss", "minus fp32 (nats)",
                   "training s", "train() s", "process s", "train samples/s (median epoch after the first)"], rows)


def _md_startup(report: dict) -> list[str]:
    rows = []
    for name, run in report["runs"].items():
        startup = run.get("startup_s")
        if not startup or run.get("process_s") is None:
            continue
        phases = ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in startup.items() if phase != "total")
        rows.append([name, f"{run['process_s']:.1f}", _num(startup.get("total"), ".2f"), phases,
                     _num(run.get("train_time_s"), ".2f")])
    if not rows:
        return ["No run recorded its start-up (summary.json's startup_s).", ""]
    return _table(["run", "process s", "start-up s (to the first step)", "start-up phases (s)", "training s"], rows)


def _epoch_row(run: dict, epoch: int) -> dict | None:
    return next((r for r in run.get("epoch_rows", []) if r["epoch"] == epoch), None)


def _md_ddp(report: dict) -> list[str]:
    ddp = report["runs"].get("DDP 2 ranks")
    if not ddp or not ddp.get("epoch_rows"):
        return _not_measured(report, "DDP on one GPU")
    epoch = ddp["epoch_rows"][-1]["epoch"]
    lines = [f"`{ddp['command']}`: backend {ddp.get('dist_backend')}, {ddp.get('num_processes')} processes on "
             f"{ddp.get('device')}, NCCL {ddp.get('nccl_version') or 'n/a'} (not used: gloo). Compared at epoch "
             f"{epoch} with one process on the same config.", ""]
    rows = []
    reference = next((name for name in ("z2 eager", "z2 default") if _epoch_row(report["runs"].get(name, {}), epoch)),
                     None)
    for name in ("DDP 2 ranks", reference):
        if name is None:
            continue
        run, row = report["runs"][name], _epoch_row(report["runs"][name], epoch)
        rows.append([name, run.get("num_processes"), _step_kind(run), f"{row['val_loss']:.3f}",
                     f"{row['samples_per_s']:,.0f}", f"{row['epoch_time_s']:.2f}"])
    lines += _table(["run", "processes", "step", f"val/loss, epoch {epoch}", f"train samples/s, epoch {epoch}",
                     f"epoch {epoch} s (train + test pass)"], rows)
    if reference is None:
        return lines + ["No one-process run reached that epoch to compare with.", ""]
    one, two = _epoch_row(report["runs"][reference], epoch), _epoch_row(ddp, epoch)
    return lines + [f"2 ranks minus 1 rank: val/loss {two['val_loss'] - one['val_loss']:+.4f} nats; speed "
                    f"{two['samples_per_s'] / one['samples_per_s']:.2f}x of one process's.", ""]


def _md_tf32(report: dict) -> list[str]:
    runs = {tf32: report["runs"].get(f"TF32 {tf32}") for tf32 in ("off", "on")}
    if not all(run and run.get("samples_per_s") for run in runs.values()):
        return _not_measured(report, "TF32 at batch 1024")
    rows = [[f"train.tf32={'true' if tf32 == 'on' else 'false'}", run.get("float32_matmul_precision"),
             _step_kind(run), run["epochs"], f"{run['val_loss']:.3f}", f"{run['samples_per_s']:,.0f}"]
            for tf32, run in runs.items()]
    off, on = runs["off"], runs["on"]
    return _table(["setting", "float32 matmul precision", "step", "epochs", "val/loss", "train samples/s (median)"],
                  rows) + [f"TF32 minus fp32: val/loss {on['val_loss'] - off['val_loss']:+.3f} nats, speed "
                           f"{on['samples_per_s'] / off['samples_per_s']:.2f}x.", ""]


def render_markdown(report: dict) -> str:
    env = report["environment"]
    title = (env.get("torch.cuda.get_device_name") if env.get("CUDA available") else
             "no CUDA (dry run)" if env else "environment not read yet")
    state = f"finished, exit status {report['exit_status']}" if "exit_status" in report else "running or stopped"
    lines = [f"# GPU check: {title}", "",
             f"Started {report['started']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
             f"{state}.", "", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "cap s", "detail"],
                    [[n, s["status"], _num(s["seconds"], ".1f"), _num(s.get("cap_s"), ".0f"), s["detail"]]
                     for n, s in report["steps"].items()])
    lines += ["## Environment", ""] + _table(["item", "value"], [[k, v] for k, v in env.items()])
    lines += ["## GPU tests (`pytest -m gpu tests/test_gpu.py`)", ""]
    lines += _table(["test", "result", "seconds", "message"],
                    [[t["name"], t["result"], f"{t['seconds']:.2f}", t["message"]] for t in report["tests"]]) \
        if report["tests"] else [f"No test results: {report['steps']['GPU tests']['detail'] or 'not run'}.", ""]
    lines += ["## Throughput (`benchmarks/throughput.py --device cuda`)", ""] + _md_throughput(report)
    lines += ["## Step profile (`benchmarks/gpu_step_profile.py`)", ""] + _md_step_profile(report)
    lines += ["## Whole runs (`train.py`; training s = sum of epoch times, process s includes start-up)", ""]
    lines += _md_runs(report)
    lines += ["## Start-up (summary.json's `startup_s`)", ""] + _md_startup(report)
    lines += ["## DDP on one GPU (2 ranks over gloo against 1 rank)", ""] + _md_ddp(report)
    lines += ["## TF32 at batch 1024 (`train.tf32`)", ""] + _md_tf32(report)
    lines += ["## Targets", ""] + _table(["target", "measured", "goal", "met"],
                                         [[t["target"], t["measured"], t["goal"], t["met"]] for t in targets(report)])
    skipped = [f"- {n}: {s['detail']}" for n, s in report["steps"].items() if s["status"] == "skipped"]
    return "\n".join(lines + (["## Skipped", "", *skipped, ""] if skipped else []))
