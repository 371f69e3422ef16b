"""Faults that really happen: kill -9, a second Ctrl-C, a dying DDP rank, a diverging loss, a nan on one step, an
unwritable run directory, a full disk. Each is done for real to a real training process (the nan on a chosen step
through tests/fault_injection, since no config produces one on demand)."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vae.storage.checkpoint import complete_states, load_model_file

from .conftest import (
    ACCELERATE_LAUNCH,
    REPO,
    accelerate_launch,
    assert_ok,
    epochs_in,
    python,
    read_jsonl,
    start,
    train_cmd,
    wait_until,
)

pytestmark = pytest.mark.slow

LONG = ["data.train_subset=20000", "train.epochs=3", "log.figures=false"]
# The Slurm scripts' launcher for several processes (accelerate launch keeping the workers' exit code)
VAE_LAUNCHER = [sys.executable, "-m", "vae.cluster.launcher", "--main_process_port", "0"]


def test_a_second_training_in_the_same_run_directory_is_refused_while_the_first_runs(tmp_path, mnist_root):
    """Two terminals, a job submitted twice: the second stops at once, names the first, and touches nothing.
    (A holder that died never blocks: the kill -9 test below resumes in the same directory.)"""
    run_dir = tmp_path / "run"
    first = start(train_cmd(run_dir, mnist_root, *LONG, "log.wandb=false"))
    wait_until(lambda: (run_dir / "config.yaml").exists(), what="the first training to start")
    second = python(*train_cmd(run_dir, mnist_root, *LONG, "log.wandb=false"))
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.startswith(f"error: {run_dir} is being trained by process {first.pid} on ")
    assert len(second.stderr.strip().splitlines()) == 1
    _, errors = first.communicate(timeout=600)
    assert first.returncode == 0, errors[-2000:]
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def _epoch_1_train_time(run_dir):
    row = read_jsonl(run_dir / "metrics.jsonl")[0]
    return sum(row["samples_per_rank"]) / row["samples_per_s"]


def test_kill_9_mid_epoch_then_same_command_equals_uninterrupted(tmp_path, mnist_root):
    """A SIGKILL cannot be caught: the run resumes from the last full checkpoint (end of epoch 1) and, since
    resuming from a checkpoint is exact, still ends with the uninterrupted run's parameters."""
    from vae.storage.checkpoint import read_trainer_state

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(python(*train_cmd(straight, mnist_root, *LONG)))
    process = start(train_cmd(killed, mnist_root, *LONG))
    wait_until(lambda: len(epochs_in(killed)) >= 1 and complete_states(killed), what="epoch 1 and its checkpoint")
    time.sleep(0.3 * _epoch_1_train_time(killed))  # about a third into epoch 2's batches
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # killed during epoch 2: epoch 1's row and checkpoint are the last there are
    assert epochs_in(killed) == [1]
    states = [read_trainer_state(path) for _, path in complete_states(killed)]
    assert [(state["epoch"], state["batches_done"]) for state in states] == [(2, 0)]
    assert_ok(python(*train_cmd(killed, mnist_root, *LONG)))
    a, b = load_model_file(straight / "last.pt")["model"], load_model_file(killed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in read_jsonl(killed / "metrics.jsonl")] == [1, 2, 3]


# sitecustomize.py for a disk that stalls: every full state after the first (epoch 1's) has its files written, then
# waits a minute before it is marked complete.
_STALLING_SAVES = """import time

import accelerate

_save_state, _saves = accelerate.Accelerator.save_state, []


def save_state(self, *args, **kwargs):
    result = _save_state(self, *args, **kwargs)
    _saves.append(1)
    if len(_saves) > 1:
        time.sleep(60)
    return result


accelerate.Accelerator.save_state = save_state
"""


def test_second_ctrl_c_exits_at_once_and_leaves_a_usable_checkpoint(tmp_path, mnist_root):
    """The first Ctrl-C stops at the next step and writes a checkpoint, which a stalled disk makes take a minute
    (_STALLING_SAVES). A second Ctrl-C leaves at once; the last complete checkpoint is intact and resumes."""
    from vae.storage.checkpoint import read_trainer_state

    settings = ["data.train_subset=5000", "train.epochs=2", "log.figures=false", "log.wandb=false"]
    run_dir, stall = tmp_path / "r", tmp_path / "stall"
    stall.mkdir()
    (stall / "sitecustomize.py").write_text(_STALLING_SAVES)
    process = start(train_cmd(run_dir, mnist_root, *settings), env={"PYTHONPATH": f"{stall}:{REPO}"})
    wait_until(lambda: complete_states(run_dir), what="epoch 1's checkpoint")  # Ctrl-C is handled by now
    process.send_signal(signal.SIGINT)
    wait_until(lambda: list((run_dir / "checkpoints").glob(".step_*.partial")), what="the stop's checkpoint")
    process.send_signal(signal.SIGINT)  # the first one was seen: its checkpoint is being written
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert time.monotonic() - sent < 30, "waited for the checkpoint"
    assert process.returncode == 130, stderr
    # not the graceful stop's "stopped by SIGINT at epoch 2, batch ...; saved ..."
    assert stderr.strip() == ("error: interrupted; the last complete checkpoint is intact, run the same command "
                              "to resume")
    states = [read_trainer_state(path) for _, path in complete_states(run_dir)]
    assert [(state["epoch"], state["batches_done"]) for state in states] == [(2, 0)]  # epoch 1's, untouched
    resumed = python(*train_cmd(run_dir, mnist_root, *settings))
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_a_dying_rank_does_not_leave_the_other_hanging(tmp_path, mnist_root):
    run_dir = tmp_path / "ddp"
    launcher = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2"]
    process = start(train_cmd(run_dir, mnist_root, "train.cpu=true", *LONG), launcher=launcher)
    wait_until(lambda: (run_dir / "metrics.jsonl").exists(), what="training to start")
    time.sleep(1.0)
    ranks = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in ranks if int(pid) != process.pid and
               "train.py" in open(f"/proc/{pid}/cmdline").read() and
               "accelerate" not in open(f"/proc/{pid}/cmdline").read()]
    assert len(workers) == 2, ranks
    started = time.monotonic()
    os.kill(max(workers), signal.SIGKILL)  # the later-started worker: rank 1
    _, stderr = process.communicate(timeout=180)
    assert process.returncode != 0
    assert time.monotonic() - started < 120
    assert "[rank0]: Traceback" not in stderr, stderr  # rank 0 says in one line that it lost rank 1
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and
                                open(f"/proc/{pid}/stat").read().split()[2] != "Z" for pid in workers),
                timeout=60, what="both ranks to exit")


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """The training processes a launcher started (its children; torchrun gives them sessions of their own):
    {rank: pid}."""
    ranks = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = dict(item.split("=", 1) for item in
                           open(f"/proc/{entry}/environ").read().split("\0") if "=" in item)
            command = open(f"/proc/{entry}/cmdline").read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and "RANK" in environ and "train.py" in command:
            ranks[int(environ["RANK"])] = int(entry)
    return ranks


def _stderr_lines(process: subprocess.Popen) -> list[tuple[float, str]]:
    """The process's stderr lines as they come, each with the time it arrived (read by a thread)."""
    import threading

    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in process.stderr),
                     daemon=True).start()
    return lines


def _two_ranks_in_epoch_2(run_dir, mnist_root, *settings, launcher=ACCELERATE_LAUNCH,
                          ) -> tuple[subprocess.Popen, dict[int, int]]:
    process = start(train_cmd(run_dir, mnist_root, "train.cpu=true", *LONG, *settings),
                    launcher=[*launcher, "--multi_gpu", "--num_processes", "2"])
    # Epoch 1's full state complete: the stop poll at its end is past, so a signal from here on is handled inside
    # epoch 2 (its metrics row alone comes before the model files and that poll, which a loaded machine can take
    # longer than a moment over).
    wait_until(lambda: epochs_in(run_dir) == [1] and complete_states(run_dir), what="epoch 1 and its checkpoint")
    time.sleep(0.5)
    ranks = _ranks(process)
    assert sorted(ranks) == [0, 1], ranks
    return process, ranks


def test_a_rank_that_stops_answering_stops_the_other_within_dist_timeout_s(tmp_path, mnist_root):
    process, ranks = _two_ranks_in_epoch_2(tmp_path / "r", mnist_root, "train.dist_timeout_s=5")
    lines = _stderr_lines(process)
    os.kill(ranks[1], signal.SIGSTOP)  # hung: alive, holding its connections, never answering
    stopped = time.monotonic()
    said = "process rank 0 stopped: another process of this launch did not answer within the process group's " \
           "timeout (train.dist_timeout_s"
    try:
        wait_until(lambda: any(said in line for _, line in lines) or process.poll() is not None, timeout=90,
                   what="rank 0's line")
        when = next((t for t, line in lines if said in line), None)
        assert when is not None, "".join(line for _, line in lines)
        assert when - stopped < 5 + 10, f"rank 0 gave up {when - stopped:.1f} s after rank 1 stopped answering"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the launcher may have ended it already
            os.kill(ranks[1], signal.SIGCONT)  # rank 1 finds rank 0 gone and stops too
    process.wait(timeout=120)
    assert process.returncode != 0
    text = "".join(line for _, line in lines)
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text
    assert "process rank 1 stopped: another process of this launch" in text, text


def test_a_second_sigterm_leaves_at_once_while_blocked_in_a_collective(tmp_path, mnist_root):
    """Rank 1 stops answering; rank 0 waits in DDP's all-reduce, where Python never runs its SIGTERM handler (so
    no checkpoint can be written). A second SIGTERM, as torchrun or a user sends, makes it leave at once."""
    process, ranks = _two_ranks_in_epoch_2(tmp_path / "r", mnist_root)
    lines = _stderr_lines(process)
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        time.sleep(1.0)
        os.kill(ranks[0], signal.SIGTERM)
        time.sleep(3.0)
        assert not any("second SIGTERM" in line for _, line in lines)  # the first one alone does not do it
        sent = time.monotonic()
        os.kill(ranks[0], signal.SIGTERM)
        wait_until(lambda: any("second SIGTERM" in line for _, line in lines), timeout=20, what="rank 0 leaving")
        assert next(t for t, line in lines if "second SIGTERM" in line) - sent < 5
        wait_until(lambda: not os.path.exists(f"/proc/{ranks[0]}") or
                   open(f"/proc/{ranks[0]}/stat").read().split()[2] == "Z", timeout=10, what="rank 0 to exit")
    finally:
        os.kill(ranks[1], signal.SIGKILL)
    process.wait(timeout=120)
    said = next(line for _, line in lines if "second SIGTERM" in line)
    assert "process rank 0" in said and "without a checkpoint" in said and "resumes" in said
    assert complete_states(tmp_path / "r")  # epoch 1's checkpoint is still there


@pytest.mark.launcher
def test_sigterm_to_rank_0_alone_stops_both_ranks_alike_and_each_rank_log_holds_its_own_line(tmp_path, mnist_root):
    """Only rank 0 gets SIGTERM (a user's kill, a node's OOM handler): both processes agree to stop mid-epoch 2
    and both stop for SIGTERM (same message, exit code 143), and vae.cluster.launcher, as the Slurm scripts run it,
    exits 143 in one line. With log.per_rank_logs, the shared output has rank 0's progress and its stop line once;
    logs/rank-0.log the same; logs/rank-1.log rank 1's own stop line, which the shared output leaves out (one line
    per node there)."""
    run_dir = tmp_path / "r"
    process, ranks = _two_ranks_in_epoch_2(run_dir, mnist_root, "log.per_rank_logs=true", launcher=VAE_LAUNCHER)
    os.kill(ranks[0], signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "FAILED" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "launcher: the training processes stopped as planned (exit code 143)"
    rank0, rank1 = ((run_dir / "logs" / f"rank-{r}.log").read_text() for r in (0, 1))
    assert "epoch   1  train/loss" in stdout and "epoch   1  train/loss" in rank0
    assert "error: stopped by SIGTERM at epoch 2" in stderr, stderr
    assert "error: stopped by SIGTERM at epoch 2" in rank0, rank0
    assert "error: (process rank 1) stopped by SIGTERM at epoch 2" in rank1, rank1
    assert "(process rank 1)" not in stderr and "epoch   1" not in rank1


def test_diverging_loss_stops_keeps_the_last_good_checkpoint_and_a_lower_lr_resumes(tmp_path, mnist_root):
    run_dir = tmp_path / "nan"
    assert_ok(python(*train_cmd(run_dir, mnist_root, "log.wandb=false")))  # epoch 1, healthy
    good = complete_states(run_dir)
    last_pt = (run_dir / "last.pt").read_bytes()

    diverged = python(*train_cmd(run_dir, mnist_root, "log.wandb=false", "train.epochs=2", "train.lr=1e12",
                                 "log.every_steps=5"))
    assert diverged.returncode == 1
    assert "training loss became" in diverged.stderr and "at epoch 2, step" in diverged.stderr
    assert "Lower train.lr" in diverged.stderr and len(diverged.stderr.strip().splitlines()) == 1
    assert complete_states(run_dir) == good and (run_dir / "last.pt").read_bytes() == last_pt
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    # The advice works: the resumed optimizer takes the lowered learning rate, not the one saved with the state
    lowered = python(*train_cmd(run_dir, mnist_root, "log.wandb=false", "train.epochs=2", "train.lr=5e-4"))
    assert_ok(lowered)
    assert "resumed with train.lr 0.001 -> 0.0005" in lowered.stdout
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [(row["epoch"], row["lr"]) for row in rows] == [(1, 1e-3), (2, 5e-4)]
    assert rows[1]["val/loss"] < rows[0]["val/loss"]


def _with_nonfinite_steps(spec: str) -> dict:
    """Environment for a training whose loss is nan at the given steps (tests/fault_injection/sitecustomize.py)."""
    return {"PYTHONPATH": f"{REPO / 'tests' / 'fault_injection'}:{REPO}", "VAE_TEST_NONFINITE_STEPS": spec}


def test_a_transient_nan_is_skipped_within_the_skip_nonfinite_budget(tmp_path, mnist_root):
    run_dir = tmp_path / "skip"
    result = python(*train_cmd(run_dir, mnist_root, "log.wandb=false", "train.skip_nonfinite=2"),
                    env=_with_nonfinite_steps("*:5,*:6"))
    assert_ok(result)
    for step in (5, 6):
        assert f"training loss not finite at epoch 1, step {step}: update skipped" in result.stdout
    row, = read_jsonl(run_dir / "metrics.jsonl")
    assert row["skipped_steps"] == 2 and row["samples_per_rank"] == [2000 - 2 * 50]
    assert torch.isfinite(torch.tensor([row["train/loss"], row["val/loss"]])).all()
    weights = load_model_file(run_dir / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_more_nonfinite_steps_than_the_budget_stop_and_default_stops_at_the_first(tmp_path, mnist_root):
    over = python(*train_cmd(tmp_path / "over", mnist_root, "log.wandb=false", "train.skip_nonfinite=1"),
                  env=_with_nonfinite_steps("*:5,*:6"))
    assert over.returncode == 1
    assert over.stderr.startswith("error: training loss was not finite at epoch 1, step 6, more than "
                                  "train.skip_nonfinite=1 times") and len(over.stderr.strip().splitlines()) == 1
    default = python(*train_cmd(tmp_path / "default", mnist_root, "log.wandb=false", "log.every_steps=5"),
                     env=_with_nonfinite_steps("*:5"))
    assert default.returncode == 1 and "training loss became nan at epoch 1, step 5" in default.stderr


def test_a_nan_on_one_ddp_rank_is_skipped_by_both(tmp_path, mnist_root):
    """Rank 1 alone sees nan: both ranks must skip the step together (neither waits in an all-reduce alone),
    and end with the same parameters."""
    run_dir = tmp_path / "ddp-skip"
    result = accelerate_launch("--multi_gpu", "--num_processes", "2",
                               *train_cmd(run_dir, mnist_root, "train.cpu=true", "log.wandb=false",
                                          "train.skip_nonfinite=1"),
                               env=_with_nonfinite_steps("1:7"), timeout=300)
    assert_ok(result)
    assert result.stdout.count("training loss not finite at epoch 1, step 7: update skipped") == 1
    row, = read_jsonl(run_dir / "metrics.jsonl")
    assert row["skipped_steps"] == 1 and row["samples_per_rank"] == [1000 - 25, 1000 - 25]
    checksums = json.loads((run_dir / "summary.json").read_text())["param_checksum_per_rank"]
    assert checksums[0] == checksums[1]


def test_unwritable_run_directory_fails_before_training(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = python(*train_cmd(blocker / "run", mnist_root))
    assert result.returncode == 1
    assert result.stderr == (f"error: run.dir {blocker / 'run'} cannot be a directory: {blocker} is a file; pass "
                             f"run.dir=<a new or empty directory, or a run's>\n")
    assert "epoch" not in result.stdout and not (tmp_path / "runs").exists()


@pytest.fixture
def small_disk(tmp_path):
    """make(mib): a real file system of that size (tmpfs) to put a run directory on. Needs root, as on CI."""
    mounts = []

    def make(mib: int):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode:
            reason = f"cannot mount a small tmpfs ({result.stderr.strip() or 'needs root'})"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True)


def _fill(disk):
    """Write into `disk` until it is full."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass


def test_a_disk_too_small_for_the_run_is_refused_before_training(small_disk, mnist_root):
    run_dir = small_disk(16) / "run"
    result = python(*train_cmd(run_dir, mnist_root, "log.wandb=false"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: run directory {run_dir} has ") and "MiB free, this run needs about" \
        in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "epoch" not in result.stdout and not (run_dir / "metrics.jsonl").exists()


def test_the_space_check_counts_what_a_resumed_run_already_holds(small_disk, mnist_root):
    """A run that fits its disk can resume on it: the states it already holds are room it reuses."""
    run_dir = small_disk(64) / "run"  # a fresh debug run needs about 60 MiB at its fullest
    assert_ok(python(*train_cmd(run_dir, mnist_root, "log.wandb=false")))
    assert_ok(python(*train_cmd(run_dir, mnist_root, "log.wandb=false", "train.epochs=3")))
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_disk_filling_up_mid_run_keeps_the_last_checkpoint_and_the_run_resumes(small_disk, mnist_root):
    run_dir = small_disk(96) / "run"
    args = train_cmd(run_dir, mnist_root, *LONG, "log.wandb=false")
    process = start(args)
    wait_until(lambda: complete_states(run_dir), what="the checkpoint of epoch 1")
    _fill(run_dir.parent)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert stderr.startswith("error: no space left on the device writing ") and len(stderr.strip().splitlines()) == 1
    assert "the last complete checkpoint (step_00000400) is kept; free some space and run the same command" in stderr
    assert [step for step, _ in complete_states(run_dir)] == [400]
    assert not list((run_dir / "checkpoints").glob(".*")) and not list(run_dir.glob(".*.tmp-*"))  # no half-writes
    assert load_model_file(run_dir / "last.pt")["epoch"] == 1

    (run_dir.parent / "filler").unlink()
    resumed = python(*args)
    assert_ok(resumed)
    assert "resuming" in resumed.stdout and "step_00000400" in resumed.stdout
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_disk_filling_up_under_ddp_is_one_line_from_each_process(small_disk, mnist_root):
    """Only the main process writes; the other learns of its exit in the next all-reduce. Each says so in one
    line (accelerate's launcher still adds its own report of the failed processes)."""
    run_dir = small_disk(96) / "run"
    launcher = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2"]
    process = start(train_cmd(run_dir, mnist_root, "train.cpu=true", *LONG, "log.wandb=false"), launcher=launcher)
    wait_until(lambda: complete_states(run_dir), what="the checkpoint of epoch 1")
    _fill(run_dir.parent)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"error: no space left on the device writing {run_dir / 'last.pt'}: the last complete checkpoint " \
           f"(step_00000400) is kept" in stderr
    assert "error: process rank 1 stopped: another process of this launch stopped first" in stderr
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr
    assert [step for step, _ in complete_states(run_dir)] == [400]


def test_a_checkpoint_one_process_cannot_write_stops_every_process_in_one_line(tmp_path, mnist_root):
    """Rank 1 fails to write its part of the full state, rank 0 succeeds: both learn it at once (no one waits for
    the other), the half-written state is removed, rank 0 says which process failed and why."""
    run_dir = tmp_path / "save-fails"
    started = time.monotonic()
    result = accelerate_launch("--multi_gpu", "--num_processes", "2",
                               *train_cmd(run_dir, mnist_root, "train.cpu=true", "log.wandb=false",
                                          "log.figures=false"),
                               env={"PYTHONPATH": f"{REPO / 'tests' / 'fault_injection'}:{REPO}",
                                    "VAE_TEST_SAVE_FAILS_ON_RANK": "1"}, timeout=300)
    assert result.returncode != 0 and time.monotonic() - started < 240
    assert "error: could not save the checkpoint of step 40: process rank 1: OSError: [Errno 28] No space left " \
           "on device" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_full_disk_is_told_apart_from_other_failures_of_other_writers(small_disk, tmp_path):
    """accelerate's save_state writes with safetensors and torch.save, which report a full disk as their own
    errors; the run still calls it a full disk (and nothing else one)."""
    from safetensors.torch import save_file

    from vae.storage.checkpoint import as_disk_full, atomic_write_bytes

    disk = small_disk(1)
    tensors = {"w": torch.zeros(2**20)}  # 4 MiB
    for write in (lambda: save_file(tensors, str(disk / "model.safetensors")),
                  lambda: torch.save(tensors, disk / "optimizer.bin")):
        with pytest.raises(Exception) as failure:
            write()
        for half_written in disk.iterdir():  # as save_full_state removes its partial directory
            half_written.unlink()
        disk_full = as_disk_full(failure.value, disk, room_needed=4 * 2**20)
        assert isinstance(disk_full, OSError) and disk_full.errno == errno.ENOSPC, failure.value
    with pytest.raises(OSError) as failure:  # the harness's own writes say it themselves, naming the file
        atomic_write_bytes(disk / "last.pt", lambda f: torch.save(tensors, f))
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(disk / "last.pt")
    assert list(disk.iterdir()) == []  # neither last.pt nor its temporary
    assert as_disk_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path, room_needed=4 * 2**20) is None
