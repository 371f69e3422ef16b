"""What the GPU check's commands left, read into report.json's entries: pytest's JUnit XML, a training run's
directory, and each step's status with its one-line detail (its verdict). Plain Python, no torch.
"""

from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_commands import Outcome, error_line

# ---------------------------------------------------------------------------------------------------------
# Reading results: pytest's JUnit XML, a run directory


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
# Verdicts: a step's status and detail from its command's outcome


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

