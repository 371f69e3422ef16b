"""Real training runs through the real entry point (train.py), on CPU, 1 and 2 processes."""

import json

import pytest
import torch

from vae.storage.checkpoint import load_model_file

from .conftest import ACCELERATE_LAUNCH, accelerate_launch, assert_ok, python, read_jsonl, run_cmd, start, train_cmd
from .test_tensorboard import read_events

pytestmark = pytest.mark.slow


def _final_weights(run_dir):
    return load_model_file(run_dir / "last.pt")["model"]


def test_short_cpu_run_writes_a_complete_run_directory(tmp_path, mnist_root):
    run_dir = tmp_path / "run"
    result = accelerate_launch(*train_cmd(run_dir, mnist_root, "train.epochs=2", "train.keep_checkpoints=1",
                                          figures=True))
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
    # output: a line per epoch, no traceback; the first line says which step runs and why
    assert "epoch   2" in result.stdout and "Traceback" not in result.stderr
    assert "| step: eager (auto: runs on cpu)" in result.stdout
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["step"] == "step: eager (auto: runs on cpu)" and environment["dist_backend"] is None
    # where this start's time went before its first step: every phase, adding up to the total
    startup = json.loads((run_dir / "summary.json").read_text())["startup_s"]
    phases = ("imports", "accelerator", "run_dir", "data", "model", "optimizer", "step", "run_files", "tracker")
    assert set(startup) == {*phases, "total"} and all(startup[p] >= 0 for p in phases)
    assert startup["total"] == pytest.approx(sum(startup[p] for p in phases), rel=1e-6)


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


def test_stopped_mid_epoch_on_2_processes_then_resumed_on_3_trains_the_1_process_model(tmp_path, mnist_root):
    """The number of processes is a deployment detail: the partial epoch's sums, the noise generator and the
    batch order carry over to another process count."""
    import signal

    from vae.storage.checkpoint import complete_states, read_trainer_state

    # 1,510 images: 30 batches of 50 and one of 10 per epoch. SIGTERM before the first step: the processes agree
    # on stopping at their first poll, after step 10, so the stop is mid-epoch on any machine.
    settings = ("log.figures=false", "log.wandb=false", "train.epochs=2", "data.train_subset=1510", "train.cpu=true")
    alone, moved = tmp_path / "alone", tmp_path / "moved"
    assert_ok(python(*train_cmd(alone, mnist_root, *settings)))
    launcher = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes"]
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
    """bf16 through the launcher really autocasts: the same run in fp32 ends close, yet not bit-identical."""
    settings = ("log.figures=false", "log.wandb=false")
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    assert_ok(accelerate_launch("--mixed_precision", "bf16", *train_cmd(bf16, mnist_root, *settings)))
    assert_ok(python(*train_cmd(fp32, mnist_root, *settings, "train.mixed_precision=no")))
    for run_dir, precision in ((bf16, "bf16"), (fp32, "no")):
        assert json.loads((run_dir / "environment.json").read_text())["mixed_precision"] == precision
    row, fp32_row = read_jsonl(bf16 / "metrics.jsonl")[0], read_jsonl(fp32 / "metrics.jsonl")[0]
    for key in ("train/loss", "val/loss"):
        assert row[key] != fp32_row[key] and row[key] == pytest.approx(fp32_row[key], abs=1.0), key
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


def _wait_for_line(process, text):
    for line in process.stdout:
        if text in line:
            return line
    raise AssertionError(f"process ended before printing {text!r}: {process.stderr.read()[-2000:]}")


def _signal_during_epoch_2(run_dir, mnist_root, overrides, signame, images):
    """Start a training and send it `signame` about a quarter into epoch 2 (timed by epoch 1's speed). Returns
    the process once it has exited, its stderr, and the newest complete state's trainer_state.json."""
    import signal
    import time

    from vae.storage.checkpoint import complete_states, read_trainer_state

    from .conftest import wait_until

    process = start(train_cmd(run_dir, mnist_root, *overrides))
    wait_until(lambda: complete_states(run_dir) or process.poll() is not None, what="epoch 1's checkpoint")
    assert complete_states(run_dir), process.communicate()[1]
    time.sleep(0.25 * images / read_jsonl(run_dir / "metrics.jsonl")[0]["samples_per_s"])
    process.send_signal(getattr(signal, signame))
    _, stderr = process.communicate(timeout=300)
    return process, stderr, read_trainer_state(complete_states(run_dir)[-1][1])


@pytest.mark.parametrize("signame, exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_epoch_checkpoints_and_resume_equals_uninterrupted(signame, exit_code, tmp_path, mnist_root):
    overrides = ["train.epochs=2", "data.train_subset=6000", "log.figures=false", "log.wandb=false"]
    batches = 6000 // 50  # per epoch
    straight = tmp_path / "straight"
    assert_ok(python(*train_cmd(straight, mnist_root, *overrides)))
    for attempt in range(3):  # a busy machine can make epoch 2 much faster or slower than epoch 1: try again
        stopped = tmp_path / f"stopped{attempt}"
        process, stderr, state = _signal_during_epoch_2(stopped, mnist_root, overrides, signame, 6000)
        if state["epoch"] == 2 and 1 < state["batches_done"] < batches:
            break
    assert state["epoch"] == 2 and 1 < state["batches_done"] < batches, state  # a mid-epoch checkpoint
    assert process.returncode == exit_code, stderr
    saved = stopped / "checkpoints" / f"step_{state['step']:08d}"
    assert stderr.strip() == (f"error: stopped by {signame} at epoch 2, batch {state['batches_done']}/{batches}; "
                              f"saved {saved}; run the same command again to resume")
    resumed = python(*train_cmd(stopped, mnist_root, *overrides))
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    a, b = _final_weights(straight), _final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows, straight_rows = read_jsonl(stopped / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    # epoch 2's training loss adds up the images before the stop (saved in the checkpoint) and those after it
    assert rows[1]["train/loss"] == pytest.approx(straight_rows[1]["train/loss"], rel=1e-9)


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


def test_a_state_that_does_not_fit_the_model_is_named_as_such_not_as_damaged(tmp_path, mnist_root):
    """Without config.yaml (copied without it, say) the model check cannot run before loading: the load itself
    finds the mismatch, and says so once instead of falling back through every older state as "damaged"."""
    run_dir = tmp_path / "r"
    settings = ("log.figures=false", "data.train_subset=200", "train.keep_checkpoints=2")
    assert_ok(python(*train_cmd(run_dir, mnist_root, *settings, "train.epochs=2")))
    (run_dir / "config.yaml").unlink()
    result = python(*train_cmd(run_dir, mnist_root, *settings, "train.epochs=3", "model.hidden=[300]"))
    assert result.returncode != 0
    assert "does not fit this run's model and optimizer (" in result.stderr, result.stderr
    assert "size mismatch" in result.stderr and "trying an older checkpoint" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_early_stopping_ends_the_run_as_finished_on_every_process(tmp_path, mnist_root):
    """train.early_stop_patience=2 with a learning rate too small to move the weights: val/loss never improves
    after epoch 1, so the run stops after epoch 3 of 10, on both processes together, and ends as a finished run.
    The same command again trains nothing more."""
    run_dir = tmp_path / "r"
    settings = ("train.epochs=10", "train.early_stop_patience=2", "train.lr=1e-30", "data.train_subset=500",
                "log.trackers=[tensorboard]", "log.images_every_epochs=100")
    result = accelerate_launch("--multi_gpu", "--num_processes", "2",
                               *train_cmd(run_dir, mnist_root, "train.cpu=true", *settings, figures=True))
    assert_ok(result)
    reason = "stopped early after epoch 3: no better val/loss for 2 epochs (train.early_stop_patience=2; the best, "
    assert reason in result.stdout and "at epoch 1)" in result.stdout
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["epoch"] == 3 and summary["best/epoch"] == 1
    assert (run_dir / "last.pt").is_file() and (run_dir / "loss.png").is_file()
    # the figures of the epoch the run ended at, as after a last epoch (step 30: 10 steps an epoch)
    assert [image.step for image in read_events(run_dir / "tensorboard").Images("figures/samples")] == [30]
    again = python(*train_cmd(run_dir, mnist_root, *settings))
    assert_ok(again)
    assert reason in again.stdout and [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_the_cpu_launcher_preset_runs_two_processes_that_report_their_speed_and_memory(tmp_path, mnist_root):
    result = run_cmd([*ACCELERATE_LAUNCH[:2], "--config_file", "configs/accelerate/cpu_2_processes.yaml",
                      *train_cmd(tmp_path / "r", mnist_root, "train.cpu=true", "log.figures=false")])
    assert_ok(result)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["param_checksum_per_rank"])) == 1
    (row,) = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert row["samples_per_rank"] == [1000, 1000]
    assert sum(row["samples_per_s_per_rank"]) == pytest.approx(row["samples_per_s"])
    assert 0 <= row["data_wait_share"] < 0.5
    assert len(row["peak_memory_mb_per_rank"]) == 2 and all(200 < mb < 8000 for mb in row["peak_memory_mb_per_rank"])
    peak = max(row["peak_memory_mb_per_rank"])
    assert f"data wait {row['data_wait_share']:.1%}  peak {peak:.0f} MB" in result.stdout


def test_a_cpu_run_under_accelerate_launch_uses_the_cores_unless_threads_were_chosen(tmp_path, mnist_root):
    """accelerate launch gives each process OMP_NUM_THREADS=1 by default (meant for GPU runs): a CPU run takes
    its share of the cores instead, unless the user chose (OMP_NUM_THREADS, train.num_threads)."""
    import os

    import psutil

    cores = min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False) or 1)
    if cores < 2:
        pytest.skip("needs at least 2 cores to tell one thread from several")
    settings = ("log.figures=false", "data.train_subset=200")

    def threads(name, *overrides, env=None):
        run_dir = tmp_path / name
        assert_ok(accelerate_launch(*train_cmd(run_dir, mnist_root, *settings, *overrides), env=env))
        return json.loads((run_dir / "environment.json").read_text())["torch_threads"]

    assert threads("default", env={"OMP_NUM_THREADS": None}) == cores
    assert threads("user-env", env={"OMP_NUM_THREADS": "1"}) == 1
    assert threads("user-key", "train.num_threads=1", env={"OMP_NUM_THREADS": None}) == 1


DETERMINISM = """
import json, sys
from vae.config import load_config
from vae.cluster.launch import environment_info, make_accelerator
print(json.dumps(environment_info(make_accelerator(load_config("configs/debug.yaml", sys.argv[1:])))["deterministic"]))
"""


def test_deterministic_mode_sets_what_torch_needs_and_environment_json_records_it():
    on = json.loads(python("-c", DETERMINISM, "train.deterministic=true", "train.cpu=true",
                           env={"CUBLAS_WORKSPACE_CONFIG": None}).stdout)
    assert on == {"algorithms": True, "cublas_workspace_config": ":4096:8", "cudnn_deterministic": True,
                  "cudnn_benchmark": False}
    off = json.loads(python("-c", DETERMINISM, "train.cpu=true", env={"CUBLAS_WORKSPACE_CONFIG": None}).stdout)
    assert off["algorithms"] is False and off["cublas_workspace_config"] is None


def test_profile_steps_writes_a_trace_and_the_top_operators_and_changes_no_number(tmp_path, mnist_root):
    settings = ("data.train_subset=600", "log.figures=false")
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    assert_ok(python(*train_cmd(plain, mnist_root, *settings)))
    result = python(*train_cmd(profiled, mnist_root, *settings, "train.profile_steps=5"))
    assert_ok(result)
    trace = json.loads((profiled / "profile" / "trace.json").read_text())
    steps = {event["name"] for event in trace["traceEvents"] if event.get("name", "").startswith("ProfilerStep#")}
    assert steps == {f"ProfilerStep#{n}" for n in range(5, 10)}  # after 5 steps of warm-up
    assert "aten::mm" in (profiled / "profile" / "top_ops.txt").read_text()
    assert f"profile of 5 steps after 5 of warm-up: {profiled / 'profile' / 'trace.json'}" in result.stdout
    for a, b in zip(read_jsonl(plain / "metrics.jsonl"), read_jsonl(profiled / "metrics.jsonl"), strict=True):
        assert (a["train/loss"], a["val/loss"]) == (b["train/loss"], b["val/loss"])
    assert not (plain / "profile").exists()


def test_ema_weights_resume_exactly_and_are_what_the_model_files_hold_and_evaluate_scores(tmp_path, mnist_root):
    """train.ema_decay: the average is part of the full state (1 + 1 epochs give the 2 straight epochs' average bit
    for bit), is scored beside the trained weights (val_ema/*), decides best.pt, and is what last.pt holds and says
    it holds; evaluate.py scores those weights and says so."""
    settings = ("train.ema_decay=0.99", "log.figures=false", "data.train_subset=1000")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(python(*train_cmd(straight, mnist_root, "train.epochs=2", *settings)))
    assert_ok(python(*train_cmd(split, mnist_root, "train.epochs=1", *settings)))
    assert_ok(python(*train_cmd(split, mnist_root, "train.epochs=2", *settings)))
    a, b = (load_model_file(run / "last.pt") for run in (straight, split))
    assert a["weights"] == b["weights"] == "ema"
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    state = next((straight / "checkpoints").glob("step_*"))
    from safetensors.torch import load_file

    trained = load_file(state / "model.safetensors")
    assert not torch.equal(trained["decoder.out.weight"], a["model"]["decoder.out.weight"])  # not the trained ones
    rows = read_jsonl(straight / "metrics.jsonl")
    assert all({"val/loss", "val_ema/loss", "val_ema/recon", "val_ema/kl"} <= row.keys() for row in rows)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["weights"] == "ema" and summary["best/val_loss"] == min(row["val_ema/loss"] for row in rows)
    ema_loss, trained_loss = rows[-1]["val_ema/loss"], rows[-1]["val/loss"]
    evaluated = python("evaluate.py", "--ckpt", str(straight / "last.pt"), "--iwae-k", "1", "--no-figures")
    assert_ok(evaluated)
    assert "of the EMA weights" in evaluated.stdout
    results = json.loads((straight / "eval" / "metrics.json").read_text())
    # evaluate.py draws other noise than the test pass: its -ELBO is near the EMA's val loss, not the trained one's
    assert results["weights"] == "ema", results
    assert abs(results["nelbo"] - ema_loss) < abs(results["nelbo"] - trained_loss) / 3, (results, rows[-1])
