"""Faults that really happen: kill -9, a second Ctrl-C, a dying DDP rank, a diverging loss, an unwritable run
directory. Each is done for real to a real training process."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from vae.checkpoint import complete_states, load_model_file

from .conftest import REPO, VENV_BIN, _env, assert_ok, python, read_jsonl, train_cmd

pytestmark = pytest.mark.slow

LONG = ["data.train_subset=20000", "train.epochs=3", "log.figures=false"]


def _start(args, launcher=None):
    command = [*launcher, *args] if launcher else [sys.executable, *args]
    return subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_until(condition, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _epochs_done(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_9_mid_epoch_then_same_command_equals_uninterrupted(tmp_path, mnist_root):
    """A SIGKILL cannot be caught: the run resumes from the last full checkpoint (end of epoch 1) and, since
    resuming from a checkpoint is exact, still ends with the uninterrupted run's parameters."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(python(*train_cmd(straight, mnist_root, *LONG)))
    process = _start(train_cmd(killed, mnist_root, *LONG))
    _wait_until(lambda: _epochs_done(killed) >= 1 and complete_states(killed), what="epoch 1 and its checkpoint")
    time.sleep(0.5)
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert_ok(python(*train_cmd(killed, mnist_root, *LONG)))
    a, b = load_model_file(straight / "last.pt")["model"], load_model_file(killed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3]


def test_second_ctrl_c_exits_at_once_and_leaves_a_usable_checkpoint(tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    process = _start(train_cmd(run_dir, mnist_root, *LONG))
    _wait_until(lambda: _epochs_done(run_dir) >= 1, what="epoch 1")
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    resumed = python(*train_cmd(run_dir, mnist_root, *LONG))
    assert_ok(resumed)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_dying_rank_does_not_leave_the_other_hanging(tmp_path, mnist_root):
    run_dir = tmp_path / "ddp"
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    process = _start(train_cmd(run_dir, mnist_root, "train.cpu=true", *LONG), launcher=launcher)
    _wait_until(lambda: (run_dir / "metrics.jsonl").exists(), what="training to start")
    time.sleep(1.0)
    ranks = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in ranks if int(pid) != process.pid and
               "train.py" in open(f"/proc/{pid}/cmdline").read() and
               "accelerate" not in open(f"/proc/{pid}/cmdline").read()]
    assert len(workers) == 2, ranks
    started = time.monotonic()
    import os
    os.kill(max(workers), signal.SIGKILL)  # the later-started worker: rank 1
    process.communicate(timeout=180)
    assert process.returncode != 0
    assert time.monotonic() - started < 120
    _wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and
                                open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers),
                timeout=60, what="both ranks to exit")


def test_diverging_loss_stops_with_epoch_and_step_and_saves_nothing_broken(tmp_path, mnist_root):
    run_dir = tmp_path / "nan"
    result = python(*train_cmd(run_dir, mnist_root, "train.lr=1e12", "log.every_steps=5"))
    assert result.returncode == 1
    assert "training loss became" in result.stderr and "at epoch 1, step" in result.stderr
    assert "Lower train.lr" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not complete_states(run_dir) and not (run_dir / "last.pt").exists()


def test_unwritable_run_directory_fails_before_training(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = python(*train_cmd(blocker / "run", mnist_root))
    assert result.returncode == 1
    assert result.stderr.startswith("error: run directory") and "not writable" in result.stderr
    assert "epoch" not in result.stdout
