"""Real training runs through the real entry point (train.py), on CPU, 1 and 2 processes."""

import json

import pytest
import torch

from vae.checkpoint import load_model_file

from .conftest import VENV_BIN, accelerate_launch, assert_ok, python, read_jsonl, start, train_cmd

pytestmark = pytest.mark.slow


def _final_weights(run_dir):
    return load_model_file(run_dir / "last.pt")["model"]


def test_short_cpu_run_writes_a_complete_run_directory(tmp_path, mnist_root):
    run_dir = tmp_path / "run"
    result = accelerate_launch(*train_cmd(run_dir, mnist_root, "train.epochs=2", "train.keep_checkpoints=1"))
    assert_ok(result)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert {"epoch", "train/loss", "val/loss", "val/recon", "val/kl", "samples_per_s"} <= row.keys()
        assert row["val/n_images"] == 10000
        assert row["val/loss"] == pytest.approx(row["val/recon"] + row["val/kl"], rel=1e-5)
    assert rows[1]["val/loss"] < rows[0]["val/loss"] < 300  # it learns
    for name in ("config.yaml", "environment.json", "summary.json", "last.pt", "best.pt", "loss.png",
                 "reconstructions.png", "samples.png", "latent.png"):
        assert (run_dir / name).is_file(), name
    # keep_checkpoints=1: only the newest full state is left
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000080"]  # 2 epochs x 40 batches
    # the model file is self-contained and loads with weights_only=True
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    assert payload["epoch"] == 2 and payload["config"]["model"]["z_dim"] == 2
    assert "val/loss" in payload["metrics"]
    # output: a line per epoch, no traceback
    assert "epoch   2" in result.stdout and "Traceback" not in result.stderr


def test_resumed_training_equals_uninterrupted_training(tmp_path, mnist_root):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(python(*train_cmd(straight, mnist_root, "train.epochs=2", "log.figures=false")))
    assert_ok(python(*train_cmd(split, mnist_root, "train.epochs=1", "log.figures=false")))
    resumed = python(*train_cmd(split, mnist_root, "train.epochs=2", "log.figures=false"))
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    a, b = _final_weights(straight), _final_weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(split / "metrics.jsonl")[1]["val/loss"] == pytest.approx(
        read_jsonl(straight / "metrics.jsonl")[1]["val/loss"], abs=1e-4)


def test_same_seed_same_result_on_cpu(tmp_path, mnist_root):
    for name in ("a", "b"):
        assert_ok(python(*train_cmd(tmp_path / name, mnist_root, "log.figures=false", "data.train_subset=500")))
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_three_processes_train_the_same_model_as_one(tmp_path, mnist_root):
    # 1,030 images at batch 50: 20 global batches split 17/17/16 over 3 processes, and a short last one of 30
    # (10 each). No batch is padded with repeats, and each image gets the noise it gets in a 1-process run.
    settings = ("log.figures=false", "data.train_subset=1030", "log.every_steps=7")
    alone, ddp = tmp_path / "alone", tmp_path / "ddp"
    assert_ok(python(*train_cmd(alone, mnist_root, *settings)))
    result = accelerate_launch("--multi_gpu", "--num_processes", "3",
                               *train_cmd(ddp, mnist_root, "train.cpu=true", *settings))
    assert_ok(result)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["num_processes"] == 3
    assert len(set(summary["param_checksum_per_rank"])) == 1  # every rank ends with identical parameters
    a, b = _final_weights(alone), _final_weights(ddp)
    for key in a:  # the same model up to the order of float sums (DDP's all-reduce)
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # Adam's moments hold the gradients themselves (its update nearly ignores their scale): the same moments
    # mean each process's loss was scaled so that DDP's average is the gradient of the global batch's sum.
    moments = [torch.load(next((run / "checkpoints").glob("step_*/optimizer.bin")), weights_only=True)["state"]
               for run in (alone, ddp)]
    for index, state in moments[0].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[1][index][key], state[key], rtol=1e-3, atol=1e-6)
    row, alone_row = read_jsonl(ddp / "metrics.jsonl")[0], read_jsonl(alone / "metrics.jsonl")[0]
    assert row["samples_per_rank"] == [350, 350, 330]
    assert row["train/loss"] == pytest.approx(alone_row["train/loss"], abs=1e-3)
    assert row["val/loss"] == pytest.approx(alone_row["val/loss"], abs=1e-3)
    assert row["val/n_images"] == 10000  # the whole test set, nothing counted twice
    env = json.loads((ddp / "environment.json").read_text())
    assert env["distributed_type"] == "DistributedType.MULTI_CPU"
    # only the main process prints
    assert result.stdout.count("epoch   1 ") == 1


def test_stopped_mid_epoch_on_2_processes_then_resumed_on_3_trains_the_1_process_model(tmp_path, mnist_root):
    """The number of processes is a deployment detail: the partial epoch's sums, the noise generator and the
    batch order carry over to another process count."""
    import signal

    from vae.checkpoint import complete_states, read_trainer_state

    # 1,510 images: 30 batches of 50 and one of 10 per epoch. SIGTERM before the first step: the processes agree
    # on stopping at their first poll, after step 10, so the stop is mid-epoch on any machine.
    settings = ("log.figures=false", "log.wandb=false", "train.epochs=2", "data.train_subset=1510", "train.cpu=true")
    alone, moved = tmp_path / "alone", tmp_path / "moved"
    assert_ok(python(*train_cmd(alone, mnist_root, *settings)))
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes"]
    two = start(train_cmd(moved, mnist_root, *settings), launcher=[*launcher, "2"])
    _wait_for_line(two, "run directory")
    two.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
    two.communicate(timeout=300)
    state = read_trainer_state(complete_states(moved)[-1][1])
    assert (state["epoch"], state["batches_done"]) == (1, 10), state
    assert_ok(accelerate_launch(*launcher[2:], "3", *train_cmd(moved, mnist_root, *settings)))
    a, b = _final_weights(alone), _final_weights(moved)
    for key in a:  # float reordering only (DDP's all-reduce), over 62 steps
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    rows, alone_rows = read_jsonl(moved / "metrics.jsonl"), read_jsonl(alone / "metrics.jsonl")
    for row, alone_row in zip(rows, alone_rows, strict=True):
        assert row["train/loss"] == pytest.approx(alone_row["train/loss"], abs=1e-3)
        assert row["val/loss"] == pytest.approx(alone_row["val/loss"], abs=1e-3)
    assert rows[1]["samples_per_rank"] == [514, 513, 483]  # 30 x (17, 17, 16) + (4, 3, 3)
    assert rows[0]["samples_per_rank"] == [344, 343, 323]  # epoch 1 after the resume: 20 x (17, 17, 16) + (4, 3, 3)


def test_compile_trains_like_eager_and_its_states_resume_without_it(tmp_path, mnist_root):
    """train.compile on the CPU (Inductor, with a recompile for the short last batch): the same model up to fused
    float arithmetic, and full states with the module's own parameter names, so a resume may drop compile."""
    from safetensors.torch import load_file

    settings = ("log.figures=false", "log.wandb=false", "data.train_subset=1010")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(python(*train_cmd(eager, mnist_root, *settings)))
    assert_ok(python(*train_cmd(compiled, mnist_root, *settings, "train.compile=true")))
    a, b = _final_weights(eager), _final_weights(compiled)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    state = load_file(next((compiled / "checkpoints").glob("step_*/model.safetensors")))
    assert sorted(state) == sorted(a)  # no "_orig_mod." prefix
    resumed = python(*train_cmd(compiled, mnist_root, *settings, "train.epochs=2"))
    assert_ok(resumed)
    assert "resuming" in resumed.stdout and "cannot resume" not in resumed.stderr + resumed.stdout


def test_multi_process_launch_without_cpu_flag_is_refused(tmp_path, mnist_root):
    """On a machine without GPUs the launcher starts N processes that each think they are alone."""
    result = accelerate_launch("--multi_gpu", "--num_processes", "2", *train_cmd(tmp_path / "r", mnist_root))
    assert result.returncode != 0
    assert "launched as 2 processes but Accelerate sees only one" in result.stderr
    assert "train.cpu=true" in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cpu_launcher_flag_with_several_processes_is_refused(tmp_path, mnist_root):
    result = accelerate_launch("--cpu", "--num_processes", "2", *train_cmd(tmp_path / "r", mnist_root))
    assert result.returncode != 0
    assert "launched as 2 processes but Accelerate sees only one" in result.stderr


def test_bf16_autocast_on_cpu(tmp_path, mnist_root):
    run_dir = tmp_path / "bf16"
    assert_ok(accelerate_launch("--mixed_precision", "bf16", *train_cmd(run_dir, mnist_root, "log.figures=false")))
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["mixed_precision"] == "bf16"
    row = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("train/loss", "val/loss"))
    assert row["val/loss"] < 300


def test_fp16_on_cpu_warns_instead_of_silently_ignoring(tmp_path, mnist_root):
    result = python(*train_cmd(tmp_path / "r", mnist_root, "train.mixed_precision=fp16", "log.figures=false",
                               "data.train_subset=200"))
    assert_ok(result)
    assert "fp16 mixed precision does nothing on CPU" in result.stdout


def test_finished_run_is_not_trained_again_and_resume_false_moves_it_aside(tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    args = train_cmd(run_dir, mnist_root, "log.figures=false", "data.train_subset=200")
    assert_ok(python(*args))
    again = python(*args)
    assert_ok(again)
    assert "already finished" in again.stdout
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    fresh = python(*args, "train.resume=false")
    assert_ok(fresh)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1 and (moved[0] / "last.pt").is_file()  # nothing of the old run is lost


def test_resuming_with_another_model_is_refused(tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    assert_ok(python(*train_cmd(run_dir, mnist_root, "log.figures=false", "data.train_subset=200")))
    result = python(*train_cmd(run_dir, mnist_root, "model.z_dim=5", "train.epochs=2"))
    assert result.returncode != 0
    assert "holds a run with a different model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _start(args):
    import subprocess
    import sys

    from .conftest import REPO, _env
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return line
    raise AssertionError(f"process ended before printing {text!r}: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signame, exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_epoch_checkpoints_and_resume_equals_uninterrupted(signame, exit_code, tmp_path, mnist_root):
    import signal
    import time

    overrides = ["train.epochs=2", "data.train_subset=6000", "log.figures=false"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert_ok(python(*train_cmd(straight, mnist_root, *overrides)))
    process = _start(train_cmd(stopped, mnist_root, *overrides))
    _wait_for_line(process, "run directory")
    time.sleep(1.5)
    process.send_signal(getattr(signal, signame))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_code, stderr
    assert f"stopped by {signame}" in stderr and "run the same command again to resume" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    resumed = python(*train_cmd(stopped, mnist_root, *overrides))
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    a, b = _final_weights(straight), _final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_jsonl(stopped / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] == pytest.approx(read_jsonl(straight / "metrics.jsonl")[0]["train/loss"], rel=1e-9)


def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    overrides = ["data.train_subset=500", "log.figures=false", "train.keep_checkpoints=3"]
    assert_ok(python(*train_cmd(run_dir, mnist_root, "train.epochs=2", *overrides)))
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # as if killed while writing
    result = python(*train_cmd(run_dir, mnist_root, "train.epochs=3", *overrides))
    assert_ok(result)
    assert f"cannot resume from {newest}" in result.stdout and "trying an older checkpoint" in result.stdout
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
