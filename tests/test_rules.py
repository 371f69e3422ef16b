"""Rules of checkpoints, resuming, the run directory and the run's counters, checked in-process in well under a
second each (the end-to-end tests reach them only through real training runs)."""

import collections
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from vae.cluster import preemption, run_dir
from vae.config import Config, LogConfig, TrainConfig
from vae.console import RunConsole
from vae.errors import TrainingError
from vae.storage import checkpoint
from vae.training.resume import batch_order_settings, resume_full_state
from vae.training.run_state import EpochResult, EpochSoFar, RunState

DiskUsage = collections.namedtuple("DiskUsage", "total used free")
MiB = 2**20


def _write_state(run, step: int, trainer_state: dict | None = None) -> None:
    """A full state folder with a valid trainer_state.json (or the given one)."""
    directory = checkpoint.state_dir(run, step)
    directory.mkdir(parents=True)
    state = trainer_state if trainer_state is not None else {"epoch": 1, "step": step, "batches_done": 0}
    (directory / checkpoint.TRAINER_STATE).write_text(json.dumps(state))


def _steps(run) -> list[int]:
    return [step for step, _ in checkpoint.complete_states(run)]


def _free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: DiskUsage(1 << 40, (1 << 40) - free, free))


# ---------------------------------------------------------------------------------------------------------
# Complete states, pruning, committing


@pytest.mark.parametrize("keep", [1, 2])
def test_prune_keeps_exactly_the_newest_k_complete_states_and_removes_partial_folders(tmp_path, keep):
    for step in (10, 20, 30, 40):
        _write_state(tmp_path, step)
    checkpoint.partial_state_dir(tmp_path, 50).mkdir()
    checkpoint.state_dir(tmp_path, 60).mkdir()  # newer, but incomplete: not one of the kept
    removed = checkpoint.prune_states(tmp_path, keep)
    assert _steps(tmp_path) == [10, 20, 30, 40][-keep:]
    assert sorted(removed) == [checkpoint.state_dir(tmp_path, s) for s in [10, 20, 30, 40][:-keep]]
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "checkpoints").iterdir())


def test_prune_with_keep_0_removes_every_complete_state(tmp_path):
    for step in (10, 20):
        _write_state(tmp_path, step)
    checkpoint.partial_state_dir(tmp_path, 30).mkdir()
    assert len(checkpoint.prune_states(tmp_path, 0)) == 2
    assert _steps(tmp_path) == []
    assert not checkpoint.partial_state_dir(tmp_path, 30).exists()


@pytest.mark.parametrize("trainer_state", [
    {"step": 20, "batches_done": 0},  # no epoch
    {"epoch": 1, "step": 20},  # no batches_done
    {"epoch": "1", "step": 20, "batches_done": 0},
    {"epoch": 1, "step": 20.0, "batches_done": 0},
    {"epoch": 1, "step": 20, "batches_done": None},
    [1, 20, 0],
], ids=["no-epoch", "no-batches_done", "str-epoch", "float-step", "null-batches_done", "not-a-dict"])
def test_a_trainer_state_with_missing_or_non_int_fields_is_incomplete(tmp_path, trainer_state):
    _write_state(tmp_path, 10)
    _write_state(tmp_path, 20, trainer_state)
    assert checkpoint.read_trainer_state(checkpoint.state_dir(tmp_path, 20)) is None
    assert _steps(tmp_path) == [10]


def test_partial_folders_and_step_folders_without_a_readable_trainer_state_are_not_complete(tmp_path):
    _write_state(tmp_path, 10)
    partial = checkpoint.partial_state_dir(tmp_path, 20)
    partial.mkdir()
    (partial / checkpoint.TRAINER_STATE).write_text(json.dumps({"epoch": 2, "step": 20, "batches_done": 0}))
    checkpoint.state_dir(tmp_path, 30).mkdir()  # no trainer_state.json
    _write_state(tmp_path, 40)
    (checkpoint.state_dir(tmp_path, 40) / checkpoint.TRAINER_STATE).write_text('{"epoch": 4, "st')  # cut short
    assert _steps(tmp_path) == [10]


def test_complete_states_are_listed_oldest_first_by_step_number(tmp_path):
    for step in (300, 5, 123456789, 40):
        _write_state(tmp_path, step)
    assert _steps(tmp_path) == [5, 40, 300, 123456789]
    assert checkpoint.complete_states(tmp_path / "nowhere") == []


def test_commit_state_renames_the_partial_folder_into_place(tmp_path):
    partial = checkpoint.partial_state_dir(tmp_path, 30)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"weights")
    state = {"epoch": 3, "step": 30, "batches_done": 0}
    final = checkpoint.commit_state(tmp_path, 30, state)
    assert final == checkpoint.state_dir(tmp_path, 30) and not partial.exists()
    assert (final / "model.safetensors").read_bytes() == b"weights"
    assert checkpoint.read_trainer_state(final) == state
    assert checkpoint.complete_states(tmp_path) == [(30, final)]


def test_commit_state_overwrites_an_older_save_of_the_same_step(tmp_path):
    _write_state(tmp_path, 30, {"epoch": 3, "step": 30, "batches_done": 0})
    (checkpoint.state_dir(tmp_path, 30) / "stale.bin").write_bytes(b"old")
    partial = checkpoint.partial_state_dir(tmp_path, 30)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"new")
    final = checkpoint.commit_state(tmp_path, 30, {"epoch": 4, "step": 30, "batches_done": 0})
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", checkpoint.TRAINER_STATE]
    assert checkpoint.read_trainer_state(final)["epoch"] == 4
    assert not partial.exists()


# ---------------------------------------------------------------------------------------------------------
# Resuming from the newest state that loads (a real Accelerator on the CPU)


@pytest.fixture(scope="module")
def prepared():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model
    AcceleratorState._reset_state(reset_partial_state=True)


def _save_full_state(accelerator, model, run, state: RunState) -> None:
    """A full state as save_full_state writes it, with every weight set to the state's step."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(state.step)
    partial = checkpoint.partial_state_dir(run, state.step)
    partial.mkdir(parents=True)
    accelerator.save_state(str(partial))
    checkpoint.commit_state(run, state.step, state.trainer_state())


def _stop(batches_done: int, loss_sum: float, seen: int) -> EpochResult:
    """What train_one_epoch returns when a stop came after `batches_done` batches."""
    return EpochResult(stopped=True, step=batches_done, batches_done=batches_done, loss_sum=loss_sum, seen=seen)


def _truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin"])
def test_resume_skips_a_damaged_newest_state_for_the_older_one_and_warns(tmp_path, prepared, capsys, damaged):
    accelerator, model = prepared
    older = RunState(epoch=3, step=20, best_loss=101.5, best_epoch=2)
    _save_full_state(accelerator, model, tmp_path, older)
    _save_full_state(accelerator, model, tmp_path, RunState(epoch=4, step=30))
    _truncate(checkpoint.state_dir(tmp_path, 30) / damaged)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val/loss": 100.0}) + "\n"
                                                    for e in (1, 2, 3)))
    state = resume_full_state(accelerator, tmp_path, Config(), RunConsole())
    assert (state.epoch, state.step, state.batches_done) == (3, 20, 0)
    assert (state.best_loss, state.best_epoch) == (101.5, 2)
    assert [row["epoch"] for row in state.history] == [1, 2]  # the epochs that state had finished
    assert all(torch.all(p == 20) for p in model.parameters())  # the older state's weights are loaded
    out = capsys.readouterr().out
    assert f"cannot resume from {checkpoint.state_dir(tmp_path, 30)}" in out
    assert "resuming" in out and "step_00000020" in out


def test_a_damaged_state_is_set_aside_so_pruning_keeps_the_newest_loadable_one(tmp_path, prepared):
    """keep_checkpoints=2 kept steps 40 and 80; 80 is damaged; the run resumes from 40, stops at step 50 and
    saves it with keep_checkpoints=1: step 50 must be what is kept (not 80, the highest number), and the damaged
    state is renamed, not deleted."""
    accelerator, model = prepared
    for step in (40, 80):
        _save_full_state(accelerator, model, tmp_path, RunState(epoch=step // 40 + 1, step=step))
    damaged = checkpoint.state_dir(tmp_path, 80)
    _truncate(damaged / "model.safetensors")
    assert resume_full_state(accelerator, tmp_path, Config(), RunConsole(enabled=False)).step == 40
    assert [step for step, _ in checkpoint.complete_states(tmp_path)] == [40]
    assert (damaged.parent / "step_00000080.unloadable").is_dir()
    mid_epoch = RunState(epoch=2, step=50)
    mid_epoch.stopped_at(_stop(10, 1000.0, 500), {"order": "epoch-batches-1"}, 12.5)
    _save_full_state(accelerator, model, tmp_path, mid_epoch)
    checkpoint.prune_states(tmp_path, keep=1, saved=checkpoint.state_dir(tmp_path, 50))
    assert [step for step, _ in checkpoint.complete_states(tmp_path)] == [50]
    assert resume_full_state(accelerator, tmp_path, Config(), RunConsole(enabled=False)).step == 50


def test_pruning_never_deletes_the_state_just_saved_even_below_an_older_runs_steps(tmp_path, prepared):
    accelerator, model = prepared
    for step in (80, 50):  # 80 left by an earlier start; 50 saved now, after a resume from an older state
        _save_full_state(accelerator, model, tmp_path, RunState(epoch=2, step=step))
    checkpoint.prune_states(tmp_path, keep=1, saved=checkpoint.state_dir(tmp_path, 50))
    assert [step for step, _ in checkpoint.complete_states(tmp_path)] == [50]


def test_resume_raises_naming_the_run_dir_when_no_state_loads(tmp_path, prepared):
    accelerator, model = prepared
    for step in (20, 30):
        _save_full_state(accelerator, model, tmp_path, RunState(epoch=step // 10, step=step))
        _truncate(checkpoint.state_dir(tmp_path, step) / "model.safetensors")
    with pytest.raises(TrainingError, match="no checkpoint in .* could be loaded") as caught:
        resume_full_state(accelerator, tmp_path, Config(), RunConsole(enabled=False))
    assert str(tmp_path) in str(caught.value)
    assert "step_00000020" in str(caught.value) and "step_00000030" in str(caught.value)
    # none loaded: maybe unreadable for a while (a busy GPU, a file server), so none is set aside
    assert [step for step, _ in checkpoint.complete_states(tmp_path)] == [20, 30]


def test_resume_takes_the_newest_state_when_it_loads(tmp_path, prepared):
    accelerator, model = prepared
    _save_full_state(accelerator, model, tmp_path, RunState(epoch=3, step=20))
    mid_epoch = RunState(epoch=4, step=27)
    mid_epoch.stopped_at(_stop(7, 700.0, 70), {"order": "epoch-batches-1"}, 3.0)
    _save_full_state(accelerator, model, tmp_path, mid_epoch)
    state = resume_full_state(accelerator, tmp_path, Config(), RunConsole(enabled=False))
    assert (state.epoch, state.step, state.batches_done, state.so_far) == (4, 27, 7, mid_epoch.so_far)
    assert all(torch.all(p == 27) for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl rows a resumed run keeps


def test_read_metrics_keeps_the_last_row_of_each_epoch_up_to_the_epoch_in_epoch_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 2, "val/loss": 9.0}, {"epoch": 1, "val/loss": 10.0}, {"epoch": 3, "val/loss": 8.0},
            {"epoch": 4, "val/loss": 7.0}, {"epoch": 2, "val/loss": 5.0}, ["not", "a", "row"], {"epoch": "3"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"epoch": 3, "val/lo')
    assert run_dir.read_metrics(path, up_to_epoch=3) == [{"epoch": 1, "val/loss": 10.0},
                                                         {"epoch": 2, "val/loss": 5.0},
                                                         {"epoch": 3, "val/loss": 8.0}]
    assert run_dir.read_metrics(path, up_to_epoch=0) == []


def test_read_metrics_of_a_missing_file_is_empty(tmp_path):
    assert run_dir.read_metrics(tmp_path / "metrics.jsonl", up_to_epoch=5) == []


# ---------------------------------------------------------------------------------------------------------
# Room on the disk


def _config(keep: int, wandb: bool = False, artifacts: bool = False, epochs: int = 5) -> Config:
    return Config(train=TrainConfig(keep_checkpoints=keep, epochs=epochs),
                  log=LogConfig(wandb=wandb, checkpoint_artifacts=artifacts))


def test_space_needed_counts_keep_checkpoints_plus_one_full_states_the_model_files_and_logs():
    model = torch.nn.Linear(10, 5)  # 55 float32 parameters
    weights = 4 * 55
    full_state = 3 * weights  # weights and Adam's two moments
    for keep in (1, 2, 5):
        expected = (keep + 1) * full_state + 2 * weights + 32 * MiB
        assert run_dir.space_needed(model, _config(keep)) == expected
    staged = 2 * weights * 5  # last.pt and best.pt of each of 5 epochs, staged for W&B
    assert run_dir.space_needed(model, _config(2, wandb=True, artifacts=True)) == 3 * full_state + 2 * weights \
        + staged + 32 * MiB
    assert run_dir.space_needed(model, _config(2, wandb=True)) == run_dir.space_needed(model, _config(2))


def test_bytes_held_counts_checkpoints_model_files_and_staged_wandb_files_only(tmp_path):
    sizes = {"last.pt": 100, "best.pt": 200, "checkpoints/step_00000010/model.safetensors": 300,
             "checkpoints/.step_00000020.partial/optimizer.bin": 400, "wandb/data/a/model.pt": 500,
             "metrics.jsonl": 10_000, "wandb/run-1/logs.txt": 20_000, "figures/loss.png": 30_000}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert run_dir._bytes_held(tmp_path) == 100 + 200 + 300 + 400 + 500


def test_room_or_fail_subtracts_what_the_run_dir_holds_and_refuses_a_disk_too_small(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"x" * MiB)
    _write_state(tmp_path, 10)
    (checkpoint.state_dir(tmp_path, 10) / "model.safetensors").write_bytes(b"x" * MiB)
    held = run_dir._bytes_held(tmp_path)
    needed = 100 * MiB
    _free_space(monkeypatch, needed - held)
    run_dir.room_or_fail(tmp_path, needed)
    _free_space(monkeypatch, needed - held - 1)
    with pytest.raises(TrainingError, match=r"has \d+\.\d MiB free, this run needs about") as caught:
        run_dir.room_or_fail(tmp_path, needed)
    assert str(tmp_path) in str(caught.value)


def test_room_or_fail_always_wants_room_for_logs_and_figures(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"x" * 2 * MiB)
    _free_space(monkeypatch, run_dir.ROOM_FOR_LOGS_AND_FIGURES - 1)
    with pytest.raises(TrainingError, match="MiB free"):
        run_dir.room_or_fail(tmp_path, MiB)  # less than the run dir holds already
    _free_space(monkeypatch, run_dir.ROOM_FOR_LOGS_AND_FIGURES)
    run_dir.room_or_fail(tmp_path, MiB)


# ---------------------------------------------------------------------------------------------------------
# Telling a full disk from other failures


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_as_disk_full_returns_an_enospc_or_edquot_error_as_it_is(tmp_path, code):
    error = OSError(code, os.strerror(code), "x")
    assert checkpoint.as_disk_full(error, tmp_path, 0) is error


@pytest.mark.parametrize("text", ["safetensors: No space left on device (os error 28)", "IoError: os error 28"])
def test_as_disk_full_reads_disk_full_words_in_other_errors_as_enospc(tmp_path, text):
    full = checkpoint.as_disk_full(RuntimeError(text), tmp_path, 0)
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC and full.filename == str(tmp_path)


SHORT_WRITE = RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")


def test_as_disk_full_counts_a_short_torch_write_only_when_free_space_is_below_the_room_needed(tmp_path,
                                                                                               monkeypatch):
    _free_space(monkeypatch, 10 * MiB)
    full = checkpoint.as_disk_full(SHORT_WRITE, tmp_path, 10 * MiB + 1)
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert checkpoint.as_disk_full(SHORT_WRITE, tmp_path, 10 * MiB) is None


@pytest.mark.parametrize("error", [ValueError("bad key"), PermissionError(errno.EACCES, "Permission denied", "x"),
                                   OSError(errno.EIO, "Input/output error", "x")], ids=["value", "permission", "eio"])
def test_as_disk_full_does_not_label_other_errors_disk_full_even_when_space_is_low(tmp_path, monkeypatch, error):
    _free_space(monkeypatch, 0)
    assert checkpoint.as_disk_full(error, tmp_path, 10 * MiB) is None


def test_as_disk_full_leaves_a_keyboard_interrupt_alone(tmp_path, monkeypatch):
    _free_space(monkeypatch, 0)
    assert checkpoint.as_disk_full(KeyboardInterrupt("No space left on device"), tmp_path, 10 * MiB) is None


def test_disk_full_error_names_the_last_complete_checkpoint(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "last.pt"))
    message = str(run_dir.disk_full_error(full, tmp_path))
    assert "no checkpoint was saved yet" in message and f"writing {tmp_path / 'last.pt'}" in message
    for step in (10, 20):
        _write_state(tmp_path, step)
    checkpoint.partial_state_dir(tmp_path, 30).mkdir()
    message = str(run_dir.disk_full_error(full, tmp_path))
    assert "the last complete checkpoint (step_00000020) is kept" in message
    assert run_dir.disk_full_error(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert run_dir.disk_full_error(ValueError("No space left on device"), tmp_path) is None


# ---------------------------------------------------------------------------------------------------------
# The run's counters (trainer_state.json)


def _round_trip(state: RunState) -> RunState:
    return RunState.from_trainer_state(json.loads(json.dumps(state.trainer_state())))


def test_an_end_of_epoch_state_survives_json():
    state = RunState(epoch=4, step=300, best_loss=101.25, best_epoch=3)
    assert "epoch_so_far" not in state.trainer_state()
    assert _round_trip(state) == state


def test_a_mid_epoch_state_survives_json_with_its_sums_and_batch_order():
    state = RunState(epoch=4, step=321, best_loss=101.25, best_epoch=3)
    state.stopped_at(_stop(21, 2345.5, 1050), batch_order_settings(Config()), 61.25)
    back = _round_trip(state)
    assert back == state and back.mid_epoch
    assert back.so_far == EpochSoFar(2345.5, 1050, batch_order_settings(Config()), train_seconds=61.25)


def test_an_infinite_best_loss_survives_json():
    back = _round_trip(RunState())
    assert back.best_loss == math.inf and back.best_epoch is None


def test_a_state_written_with_the_old_partial_key_is_read():
    state = {"epoch": 2, "batches_done": 5, "step": 15, "best": {"val/loss": 120.0, "epoch": 1},
             "partial": {"loss_sum": 500.0, "seen": 250, "batch_order": {"order": "epoch-batches-1"}}}
    back = RunState.from_trainer_state(json.loads(json.dumps(state)))
    assert back.so_far == EpochSoFar(500.0, 250, {"order": "epoch-batches-1"})
    assert (back.epoch, back.batches_done, back.step, back.best_loss, back.best_epoch) == (2, 5, 15, 120.0, 1)


def test_finish_epoch_moves_to_the_next_epoch_and_updates_best_only_on_improvement():
    state = RunState(epoch=1, step=10)
    state.stopped_at(_stop(4, 40.0, 20), {"order": "epoch-batches-1"}, 1.0)
    assert state.finish_epoch({"epoch": 1, "val/loss": 100.0}) is True
    assert (state.epoch, state.batches_done, state.so_far) == (2, 0, EpochSoFar())
    assert (state.best_loss, state.best_epoch) == (100.0, 1)
    assert state.finish_epoch({"epoch": 2, "val/loss": 100.0}) is False  # equal is no improvement
    assert state.finish_epoch({"epoch": 3, "val/loss": 110.0}) is False
    assert (state.epoch, state.best_loss, state.best_epoch) == (4, 100.0, 1)
    assert state.finish_epoch({"epoch": 4, "val/loss": 90.0}) is True
    assert (state.epoch, state.best_loss, state.best_epoch) == (5, 90.0, 4)
    assert [row["epoch"] for row in state.history] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------
# One training per run directory


def _in_child(work) -> tuple[int, str]:
    """Run work() in a forked child; its exit code and what it wrote back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            code, message = work()
            os.write(write_end, message.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), message


def _try_lock(directory):
    def work():
        try:
            run_dir.RunDirLock(directory).acquire()  # held until the child exits
        except TrainingError as e:
            return 3, str(e)
        return 0, "acquired"
    return work


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_second_lock_on_the_same_run_dir_in_another_process_is_refused(tmp_path):
    lock = run_dir.RunDirLock(tmp_path).acquire()
    try:
        code, message = _in_child(_try_lock(tmp_path))
    finally:
        lock.release()
    assert code == 3, message
    assert f"{tmp_path} is being trained by process {os.getpid()}" in message
    assert _in_child(_try_lock(tmp_path)) == (0, "acquired")  # released: free again


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_lock_file_left_by_a_dead_holder_does_not_block(tmp_path):
    assert _in_child(_try_lock(tmp_path)) == (0, "acquired")  # the child died holding it, never released
    assert "process" in (tmp_path / ".lock").read_text()
    lock = run_dir.RunDirLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().startswith(f"process {os.getpid()} ")
    lock.release()


# ---------------------------------------------------------------------------------------------------------
# Starts without progress: the requeue cap


def _stops(directory, *trained_steps):
    for trained in trained_steps:
        preemption.record_start(directory)
        preemption._append(directory, {"event": "stop", "signal": "SIGUSR1", "trained_steps": trained})


def test_stops_without_progress_are_counted_back_to_the_last_stop_that_trained(tmp_path):
    assert preemption.stops_without_progress(tmp_path) == 0  # no record yet
    _stops(tmp_path, 0, 0, 120, 0, 0)
    with open(tmp_path / preemption.STARTS_FILE, "a") as f:
        f.write('{"event": "stop", "trai')  # cut by a kill
    assert preemption.stops_without_progress(tmp_path) == 2
    _stops(tmp_path, 5)
    assert preemption.stops_without_progress(tmp_path) == 0


def test_a_start_that_ended_without_a_stop_record_ends_the_count_of_idle_stops(tmp_path):
    _stops(tmp_path, 0, 0)
    preemption.record_start(tmp_path)  # killed (kill -9, a node failure): no stop record, maybe trained
    _stops(tmp_path, 0)
    assert preemption.stops_without_progress(tmp_path) == 1
    preemption.record_start(tmp_path)  # the start now running, whose stop is being settled
    assert preemption.stops_without_progress(tmp_path) == 1


def test_the_third_start_in_a_row_without_progress_is_not_requeued(tmp_path):
    _stops(tmp_path, 7, 0, 0)
    stop = preemption.StoppedToResume("stopped by SIGUSR1 at start-up", "SIGUSR1", "start-up", requeue_job="42")
    stop.settle(tmp_path, trained_steps=0, main_process=True)
    assert str(stop).endswith("; not requeued: the last 3 starts of this run were stopped before they trained a "
                              "step (the warning came during start-up); give the job more time (--time) or the "
                              "warning earlier (--signal=B:USR1@<more seconds>) and submit it again")
    assert stop.exit_code == 138
    last = json.loads((tmp_path / preemption.STARTS_FILE).read_text().splitlines()[-1])
    assert (last["event"], last["trained_steps"], last["requeued"]) == ("stop", 0, False)
    assert preemption.stops_without_progress(tmp_path) == 3


def _stand_in_scontrol(folder, monkeypatch, body: str) -> None:
    """A `scontrol` first on PATH: the race below cannot be timed on the test cluster."""
    (folder / "scontrol").write_text(f'#!/bin/sh\n[ "$1 $2" = "requeue 42" ] || exit 3\n{body}\n')
    (folder / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_a_requeue_is_reported_as_done_even_when_its_own_sigterm_reaches_scontrol_first(tmp_path, monkeypatch):
    # scontrol runs inside the job, and the requeue SIGTERMs every process of the job: here before it exits.
    _stand_in_scontrol(tmp_path, monkeypatch, "kill -TERM $$\nsleep 0.2\nexit 0")
    assert preemption.requeue_slurm_job("42").startswith("requeued Slurm job 42;")


def test_a_refused_requeue_says_why_and_to_resubmit(tmp_path, monkeypatch):
    _stand_in_scontrol(tmp_path, monkeypatch, "echo 'Requested operation is presently disabled' >&2\nexit 1")
    assert preemption.requeue_slurm_job("42") == ("could not requeue Slurm job 42 (Requested operation is presently "
                                                  "disabled); resubmit it to resume")


# ---------------------------------------------------------------------------------------------------------
# Nothing is written through a symbolic link planted in a run directory


def _append_metrics_row(directory):
    from vae.storage.files import open_append

    with open_append(directory / "metrics.jsonl") as f:  # as each epoch's row is added
        f.write(b"{}\n")


def _save_png(directory):
    from matplotlib.figure import Figure

    from vae.figures.plots import save

    save(Figure(figsize=(1, 1)), directory / "loss.png")


APPENDS = {".lock": lambda d: run_dir.RunDirLock(d).acquire(), "starts.jsonl": preemption.record_start,
           "metrics.jsonl": _append_metrics_row}
REPLACES = {"config.yaml": lambda d: checkpoint.atomic_write_text(d / "config.yaml", "a: 1\n"),
            "loss.png": _save_png}


def _run_with_a_planted_link(tmp_path, name):
    """A run directory whose `name` is a link to another user's file: (run directory, that file)."""
    victim = tmp_path / "someone-elses-file.txt"
    victim.write_text("their data\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    return run, victim


@pytest.mark.parametrize("name", APPENDS)
def test_a_file_written_in_place_refuses_a_symlink_in_one_line_and_leaves_its_target_alone(tmp_path, name):
    run, victim = _run_with_a_planted_link(tmp_path, name)
    with pytest.raises(TrainingError, match=f"{run / name} is a symbolic link .*remove the link"):
        APPENDS[name](run)
    assert victim.read_text() == "their data\n"


@pytest.mark.parametrize("name", REPLACES)
def test_a_file_written_atomically_replaces_a_symlink_and_leaves_its_target_alone(tmp_path, name):
    run, victim = _run_with_a_planted_link(tmp_path, name)
    tmp_name = f".{name}.tmp-{os.getpid()}" if name != "loss.png" else f".loss.tmp-{os.getpid()}.png"
    (run / tmp_name).symlink_to(victim)  # the temporary name is predictable: planted too
    REPLACES[name](run)
    assert victim.read_text() == "their data\n"
    assert not (run / name).is_symlink() and (run / name).stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------
# Only a run directory is ever moved aside (train.resume=false)


DEBUG_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"


def _a_finished_run(directory):
    directory.mkdir(parents=True)
    for name, text in (("config.yaml", "model: {}\n"), (run_dir.RUN_MARKER, ""), ("metrics.jsonl", "{}\n")):
        (directory / name).write_text(text)


def _start_afresh(path, prepared):
    from vae.config import load_config

    cfg = load_config(str(DEBUG_CONFIG), [f"run.dir={path}", "train.resume=false"])
    resume, lock = run_dir.prepare_run_dir(cfg, prepared[0], RunConsole(enabled=False))
    lock.release()
    return resume


def test_resume_false_through_a_symlinked_run_dir_moves_its_target_and_keeps_the_link(tmp_path, prepared):
    scratch, link = tmp_path / "scratch" / "run", tmp_path / "run"
    _a_finished_run(scratch)
    link.symlink_to(scratch)
    assert _start_afresh(link, prepared) is False
    assert link.is_symlink() and link.resolve() == scratch  # still pointing at the scratch disk
    assert (scratch / run_dir.RUN_MARKER).is_file() and not (scratch / "metrics.jsonl").exists()
    moved = [p for p in scratch.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file()


def test_resume_false_never_moves_the_directory_it_runs_from(tmp_path, prepared, monkeypatch):
    _a_finished_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(TrainingError, match="holds the current directory; run from another directory"):
        _start_afresh(".", prepared)
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("resume", ["true", "false"])
def test_a_folder_of_the_users_is_refused_as_a_run_dir_before_anything_is_written(tmp_path, resume):
    from vae.config import load_config

    folder = tmp_path / "Documents"
    folder.mkdir()
    for name in ("config.yaml", "summary.json", "thesis.txt"):
        (folder / name).write_text(f"the user's {name}\n")
    cfg = load_config("configs/debug.yaml", [f"run.dir={folder}", f"train.resume={resume}"])
    with pytest.raises(TrainingError, match=f"run.dir {folder} holds files but is not a run directory"):
        run_dir.check_run_dir(cfg.run_dir)
    assert sorted(os.listdir(folder)) == ["config.yaml", "summary.json", "thesis.txt"]
    run_dir.check_run_dir(tmp_path / "new")  # new, empty or a run: fine
    _a_finished_run(tmp_path / "a-run")
    run_dir.check_run_dir(tmp_path / "a-run")
    older = tmp_path / "a-run-of-an-older-version"  # no .vae-run: its config.yaml and metrics.jsonl say so
    _a_finished_run(older)
    (older / run_dir.RUN_MARKER).unlink()
    run_dir.check_run_dir(older)


def test_an_epoch_whose_every_step_was_skipped_stops_as_a_non_finite_loss():
    from vae.training.step import stop_if_not_finite

    skipped_all = EpochResult(stopped=False, step=40, batches_done=40, loss_sum=0.0, seen=0, skipped=40)
    with pytest.raises(TrainingError, match="training loss became nan at epoch 1, step 40"):
        stop_if_not_finite(skipped_all.mean_loss, 1, 40)


@pytest.mark.parametrize("key", ["data.root", "run.dir"])
def test_a_path_that_cannot_be_a_folder_is_one_line_before_anything_is_written(tmp_path, key):
    from vae.config import load_config
    from vae.errors import HarnessError

    (tmp_path / "a-file").write_text("mine")
    cfg = load_config(str(DEBUG_CONFIG), [f"{key}={tmp_path / 'a-file' / 'below'}"])
    with pytest.raises(HarnessError, match=f"{key} {tmp_path / 'a-file' / 'below'} cannot be a (folder|directory): "
                                           f"{tmp_path / 'a-file'} is a file"):
        run_dir.check_paths(cfg)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_a_file_system_without_flock_is_one_line_naming_run_lock_false(tmp_path, prepared, monkeypatch):
    import fcntl

    from vae.config import load_config

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted noflock

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(TrainingError, match=r"cannot lock .*\(Function not implemented\): this file system has no "
                                            r"flock; pass run.lock=false"):
        run_dir.RunDirLock(tmp_path).acquire()
    cfg = load_config(str(DEBUG_CONFIG), [f"run.dir={tmp_path / 'run'}", "run.lock=false"])
    assert run_dir.prepare_run_dir(cfg, prepared[0], RunConsole(enabled=False)) == (False, None)
