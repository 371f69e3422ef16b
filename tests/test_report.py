"""python -m vae.report on a folder of real runs: finished, stopped by a signal, failed, and one still locked by a
training (running)."""

import json
import os
import signal
import time

import pytest

from vae.cluster.run_dir import RunDirLock

from .conftest import assert_ok, epochs_in, python, start, train_cmd, wait_until

pytestmark = pytest.mark.slow

SMALL = ("data.train_subset=500", "train.epochs=2", "log.figures=false")


def test_report_tables_and_plots_every_run_with_its_status(tmp_path, mnist_root):
    runs = tmp_path / "sweep"
    for z in (2, 3):
        assert_ok(python(*train_cmd(runs / f"z{z}", mnist_root, *SMALL, f"model.z_dim={z}")))
    failed = python(*train_cmd(runs / "diverged", mnist_root, *SMALL, "train.lr=1e12", "log.every_steps=2"))
    assert failed.returncode == 1
    stopping = start(train_cmd(runs / "stopped", mnist_root, "data.train_subset=8000", "train.epochs=3",
                               "log.figures=false"))
    wait_until(lambda: epochs_in(runs / "stopped") == [1], what="epoch 1")
    stopping.send_signal(signal.SIGTERM)
    assert stopping.wait(timeout=120) == 143
    lock = RunDirLock(runs / "z3").acquire()  # as a training in progress holds it
    try:
        started = time.monotonic()
        result = python("-m", "vae.report", str(runs))
    finally:
        lock.release()
    assert_ok(result)
    assert time.monotonic() - started < 60
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    assert set(lines) == {"diverged", "stopped", "z2", "z3"}, result.stdout
    header = next(line for line in result.stdout.splitlines() if "┃ run" in line)
    assert "model.z_dim" in header and "train.lr" in header and "status" in header
    for name, status in (("z2", "finished"), ("z3", "running"), ("stopped", "stopped"), ("diverged", "failed")):
        assert lines[name].rstrip(" │").endswith(status), lines[name]
    assert " 2/2 " in lines["z2"] and " 1/3 " in lines["stopped"]
    png = runs / "report.png"
    assert f"wrote {png}" in result.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_folder_without_runs_is_one_line(tmp_path):
    result = python("-m", "vae.report", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: no run directory under {tmp_path} (a run directory holds config.yaml and "
                             f".vae-run): give runs/ or a sweep's folder\n")


def _synthetic_run(folder, events, finished_at=None, config="train: {epochs: 4}\n"):
    """A run directory as training leaves it: config.yaml, its marker, metrics rows, starts.jsonl (events:
    (event, time) pairs) and summary.json written at `finished_at` (seconds since the epoch)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / ".vae-run").touch()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val/loss": 200.0 - e}) + "\n"
                                                  for e in (1, 2)))
    (folder / "starts.jsonl").write_text("".join(json.dumps({"event": event, "time": time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(when))}) + "\n" for event, when in events))
    if finished_at is not None:
        (folder / "summary.json").write_text("{}")
        os.utime(folder / "summary.json", (finished_at, finished_at))


def test_report_reads_status_from_the_newest_event_and_skips_what_is_not_a_run(tmp_path):
    now = time.time()
    _synthetic_run(tmp_path / "finished", [("start", now - 100)], finished_at=now - 50)
    # finished, then resumed with more epochs and stopped: its summary.json is the earlier finish's
    _synthetic_run(tmp_path / "resumed-then-stopped", [("start", now - 300), ("start", now - 100),
                                                       ("stop", now - 60)], finished_at=now - 200)
    _synthetic_run(tmp_path / "resumed-then-crashed", [("start", now - 300), ("start", now - 100)],
                   finished_at=now - 200)
    _synthetic_run(tmp_path / "list-config", [("start", now)], config="- not\n- a run\n")
    _synthetic_run(tmp_path / "broken-config", [("start", now)], config="train: [unclosed\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.yaml").write_text("- someone's own\n")  # no .vae-run: not a run at all
    result = python("-m", "vae.report", str(tmp_path))
    assert_ok(result)
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    assert set(lines) == {"finished", "resumed-then-stopped", "resumed-then-crashed"}, result.stdout
    for name, status in (("finished", "finished"), ("resumed-then-stopped", "stopped"),
                         ("resumed-then-crashed", "failed")):
        assert lines[name].rstrip(" │").endswith(status), lines[name]
    assert "Traceback" not in result.stderr
    for name in ("list-config", "broken-config"):
        assert f"skipped {tmp_path / name}: its config.yaml is not a run's" in result.stderr, result.stderr
