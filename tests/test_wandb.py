"""Weights & Biases, offline: real trainings through train.py and `accelerate launch`, read back from the .wandb
files they write (tests/wandb_records.py). No server, no login: every test runs with a fresh HOME (no ~/.netrc,
no wandb settings) and no WANDB_* variables unless it sets them."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml

from vae.config import ConfigError, LogConfig, load_config
from vae.console import RunConsole
from vae.tracking import RUN_FILE, Tracker

from .conftest import REPO, VENV_BIN, _env, accelerate_launch, assert_ok, python, read_jsonl, run_cmd, train_cmd
from .wandb_records import BLOCK, WandbFileError, iter_payloads, offline_run_dirs, read_offline_run, wandb_file

FAKE_KEY = "vaeharnesstest" + "0" * 30  # the shape of an API key (40+ word characters), not a real one
STEPS_PER_EPOCH = 40  # configs/debug.yaml: 2,000 images, global batch 50

# The overrides of the shared run: 2 epochs, train/* every 15 steps (so that epoch ends, at 40 and 80, are rows
# of their own), figures every 2 epochs (so epoch 1 has none), model artifacts on, TensorBoard next to W&B.
RUN_OVERRIDES = ["train.epochs=2", "log.every_steps=15", "log.images_every_epochs=2", "log.tags=[test, debug]",
                 "log.group=ci", "log.checkpoint_artifacts=true", "log.trackers=[wandb, tensorboard]"]


@pytest.fixture(scope="module", autouse=True)
def no_credentials(tmp_path_factory):
    """A HOME without ~/.netrc or wandb settings, and no WANDB_* variables: W&B has no credentials."""
    import matplotlib

    home = tmp_path_factory.mktemp("home")
    font_cache = matplotlib.get_cachedir()  # the usual one, found before HOME changes: no font cache rebuild
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("WANDB_") or name == "NETRC":
                mp.delenv(name)
        mp.setenv("HOME", str(home))
        mp.setenv("MPLCONFIGDIR", font_cache)
        yield home


def _expected_steps(first_step: int, last_step: int, every: int, steps_per_epoch: int) -> list[int]:
    """The history rows of a training from first_step to last_step: train/* every `every` steps, plus the end of
    each epoch (merged into one row where they coincide)."""
    steps = {s for s in range(first_step, last_step + 1) if s % every == 0 or s % steps_per_epoch == 0}
    return sorted(steps)


def _segment(run_dir: Path, index: int = 0):
    return read_offline_run(offline_run_dirs(run_dir)[index])


# ---------------------------------------------------------------------------------------------------------
# One real training without credentials, looked at from several sides


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, mnist_root, no_credentials):
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    repo_wandb_before = (REPO / "wandb").exists()
    # WANDB_MODE unset, as for a user who never ran `wandb login`: the harness itself must choose offline
    # (no_credentials guarantees there is nothing to upload with).
    args = train_cmd(run_dir, mnist_root, *RUN_OVERRIDES, wandb=True, figures=True)
    result = python(*args, env={"WANDB_MODE": None}, timeout=300)
    assert_ok(result)
    if not repo_wandb_before:
        assert not (REPO / "wandb").exists(), "W&B wrote into the repository root"
    return run_dir, result


@pytest.mark.slow
def test_no_credentials_logs_offline_and_prints_the_sync_command_once(offline_run):
    run_dir, result = offline_run
    segments = offline_run_dirs(run_dir)
    assert len(segments) == 1
    run_id = json.loads((run_dir / RUN_FILE).read_text())["id"]
    assert segments[0].name.endswith(f"-{run_id}")
    assert result.stdout.count(f"W&B run {run_id} is logged offline (no credentials found") == 1
    assert result.stdout.count(f"wandb sync {segments[0]}") == 1
    # wandb's own banner and footer are silenced; nothing of W&B's on stderr
    assert "wandb:" not in result.stdout and "wandb:" not in result.stderr
    # the run still wrote everything else
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "samples.png").is_file()


@pytest.mark.slow
def test_config_history_and_summary(offline_run):
    run_dir, _ = offline_run
    run = _segment(run_dir)
    assert run.run_id == json.loads((run_dir / RUN_FILE).read_text())["id"]
    assert (run.project, run.display_name, run.group, run.tags) == ("vae-mnist", "debug", "ci", ["test", "debug"])
    assert run.exit_code == 0
    # the resolved config tree: every section, as the run directory's config.yaml holds it
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {"data", "model", "train", "run", "log"} <= written.keys()
    assert {section: run.config[section] for section in written} == written
    assert run.config["train"]["epochs"] == 2
    assert (run.config["model"]["z_dim"], run.config["model"]["hidden"]) == (2, [400])
    assert run.config["log"]["tags"] == ["test", "debug"] and run.config["run"]["dir"] == str(run_dir)
    # history: train/* every 15 steps, val/* at each epoch's end, never backwards
    assert run.steps == _expected_steps(1, 2 * STEPS_PER_EPOCH, 15, STEPS_PER_EPOCH) == [15, 30, 40, 45, 60, 75, 80]
    train_keys = {"train/loss", "train/recon", "train/kl", "train/lr", "train/samples_per_s"}
    epoch_keys = {"epoch", "val/loss", "val/recon", "val/kl", "train/epoch_loss", "perf/samples_per_s",
                  "perf/data_wait_share", "perf/peak_memory_mb"}
    for row in run.history:
        assert (train_keys <= row.keys()) == (row["_step"] % 15 == 0), row["_step"]
        assert (epoch_keys <= row.keys()) == (row["_step"] % STEPS_PER_EPOCH == 0), row["_step"]
    for row in run.rows_with("train/loss"):
        assert row["train/loss"] == pytest.approx(row["train/recon"] + row["train/kl"], rel=1e-9)
        assert row["train/lr"] == pytest.approx(1e-3) and row["train/samples_per_s"] > 0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    epochs = run.rows_with("val/loss")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for row, line in zip(epochs, metrics, strict=True):
        assert row["val/loss"] == pytest.approx(line["val/loss"]) and row["_step"] == line["step"]
        assert row["train/epoch_loss"] == pytest.approx(line["train/loss"])
    # epoch-level charts use `epoch` as their x-axis
    assert run.metrics["val/*"]["step_metric"] == "epoch" and run.metrics["figures/*"]["step_metric"] == "epoch"
    assert run.metrics["perf/*"]["step_metric"] == "epoch"
    for row, line in zip(epochs, metrics, strict=True):
        assert row["perf/peak_memory_mb"] == pytest.approx(max(line["peak_memory_mb_per_rank"]))
    # summary: best val/loss and its epoch, final numbers, time
    best = min(metrics, key=lambda r: r["val/loss"])
    assert run.summary["best/val_loss"] == pytest.approx(best["val/loss"])
    assert run.summary["best/epoch"] == best["epoch"]
    # val/loss is summarised as its minimum over the epochs (define_metric summary="min"), not its last value
    assert run.metrics["val/loss"] == {"step_metric": "epoch", "glob": False, "summary": ["min"]}
    assert run.summary["val/loss"] == {"min": pytest.approx(best["val/loss"])}
    assert run.summary["wall_time_s"] > 0 and run.summary["train_time_s"] == pytest.approx(
        sum(r["epoch_time_s"] for r in metrics))
    assert run.summary["num_processes"] == 1


@pytest.mark.slow
def test_tensorboard_next_to_wandb_gets_the_same_scalars_and_the_figures(offline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = offline_run
    run = _segment(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for tag in ("train/loss", "train/kl", "val/loss", "val/recon", "perf/samples_per_s"):
        rows = run.rows_with(tag)
        assert [p.step for p in events.Scalars(tag)] == [row["_step"] for row in rows], tag
        assert [p.value for p in events.Scalars(tag)] == pytest.approx([row[tag] for row in rows], rel=1e-6), tag
    assert [p.step for p in events.Scalars("val/loss")] == [40, 80]
    for name in ("reconstructions", "samples", "latent", "manifold", "interpolation"):
        assert [image.step for image in events.Images(f"figures/{name}")] == [80], name
    assert not any(tag.startswith("latent/") for tag in events.Tags()["scalars"])  # W&B's table stays W&B's
    assert result.stdout.count(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}") == 1


@pytest.mark.slow
def test_figures_latent_table_and_model_artifacts(offline_run):
    run_dir, _ = offline_run
    run = _segment(run_dir)
    segment = offline_run_dirs(run_dir)[0]
    names = ("reconstructions", "samples", "latent", "manifold", "interpolation")
    with_figures = [row for row in run.history if "figures/samples/_type" in row]
    assert [row["_step"] for row in with_figures] == [80]  # images_every_epochs=2: epoch 2 only
    row = with_figures[0]
    for name in names:
        assert row[f"figures/{name}/_type"] == "image-file", name
        assert (segment / "files" / row[f"figures/{name}/path"]).stat().st_size > 5_000, name
    # log.latent_points: the first 2,000 test images by default
    assert row["latent/means_table/_type"] == "table-file" and row["latent/means_table/nrows"] == 2000
    table = json.loads((segment / "files" / row["latent/means_table/path"]).read_text())
    assert table["columns"] == ["z0", "z1", "digit"] and len(table["data"]) == 2000
    assert {r[2] for r in table["data"]} == set(range(10))
    assert "_wandb/visualize/latent/means" in run.config  # the scatter plot of that table
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert [sorted(a["aliases"]) for a in models] == [["best", "epoch-1", "latest"], ["best", "epoch-2", "latest"]]
    assert all(a["files"] == ["config.yaml", "model.pt"] and a["metadata"]["epoch"] in (1, 2) for a in models)
    # what `wandb sync` will upload for the artifacts (the model files, the table) is kept in the run directory
    staged = [Path(p) for a in run.artifacts for p in a["local_paths"]]
    assert len(staged) == 5 and all(p.is_file() and p.is_relative_to(run_dir / "wandb") for p in staged), staged
    for artifact in models:  # each version carries the run's config beside its model file
        files = dict(zip(artifact["files"], artifact["local_paths"], strict=True))
        assert Path(files["config.yaml"]).read_text() == (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_resume_continues_the_same_run_in_a_second_offline_segment(offline_run, tmp_path, mnist_root):
    source, _ = offline_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, symlinks=True)
    overrides = [o for o in RUN_OVERRIDES if not o.startswith("train.epochs")] + ["train.epochs=3"]
    result = python(*train_cmd(run_dir, mnist_root, *overrides, wandb=True), timeout=300)
    assert_ok(result)
    assert "resuming" in result.stdout
    first, second = (read_offline_run(d) for d in offline_run_dirs(run_dir))
    run_id = json.loads((run_dir / RUN_FILE).read_text())["id"]
    assert first.run_id == second.run_id == run_id
    assert json.loads((run_dir / RUN_FILE).read_text())["last_step"] == 3 * STEPS_PER_EPOCH
    # the second start logs only what comes after the first: steps never go backwards
    assert second.steps == _expected_steps(2 * STEPS_PER_EPOCH + 1, 3 * STEPS_PER_EPOCH, 15, STEPS_PER_EPOCH)
    assert min(second.steps) > max(first.steps)
    assert [r["epoch"] for r in second.rows_with("val/loss")] == [3]
    assert [r["_step"] for r in second.history if "figures/samples/_type" in r] == [120]  # the last epoch
    assert second.config["train"]["epochs"] == 3
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert second.summary["best/val_loss"] == pytest.approx(min(r["val/loss"] for r in metrics))
    # the printed command uploads both segments into one run, oldest first (here: as far as a dry run goes)
    assert f"wandb sync --id {run_id} {run_dir / 'wandb'}/offline-run-*-{run_id}" in result.stdout
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    dry = run_cmd([str(VENV_BIN / "wandb"), "sync", "--dry-run", "--id", run_id, *map(str, segments)], timeout=120)
    assert_ok(dry)
    listed = [line.split()[-1] for line in dry.stderr.splitlines() if line.strip().endswith(".wandb")]
    assert [Path(line).parent.name for line in listed] == [s.name for s in segments]


@pytest.mark.slow
def test_sigterm_marks_the_run_preempted_and_the_requeued_job_continues_it(tmp_path, mnist_root):
    """What Slurm does before a time limit or a preemption: SIGTERM (or SIGUSR1), then the job runs again."""
    run_dir = tmp_path / "r"
    args = train_cmd(run_dir, mnist_root, "data.train_subset=6000", "train.epochs=3", "log.figures=false",
                     "log.images_every_epochs=0", wandb=True)
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # in epoch 2
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert len(stderr.strip().splitlines()) == 1 and "stopped by SIGTERM" in stderr  # nothing of wandb's
    assert_ok(python(*args, timeout=300))
    first, second = (read_offline_run(d) for d in offline_run_dirs(run_dir))
    assert first.record_kinds.get("preempting") == 1 and first.exit_code == 143
    assert second.run_id == first.run_id and second.exit_code == 0
    assert max(first.steps) >= 120 and min(second.steps) > max(first.steps) and max(second.steps) == 3 * 120
    assert [r["epoch"] for r in first.rows_with("val/loss") + second.rows_with("val/loss")] == [1, 2, 3]


@pytest.mark.slow
def test_evaluate_logs_into_the_same_run(offline_run, tmp_path):
    source, _ = offline_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, symlinks=True)
    result = python("evaluate.py", "--ckpt", str(run_dir), "--iwae-k", "2", "--wandb", timeout=300)
    assert_ok(result)
    segments = offline_run_dirs(run_dir)
    assert len(segments) == 2
    train_run, eval_run = read_offline_run(segments[0]), read_offline_run(segments[1])
    assert eval_run.run_id == train_run.run_id
    assert eval_run.steps == [max(train_run.steps) + 1]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for key in ("nelbo", "recon", "kl", "iwae_nll", "active_units"):
        assert eval_run.summary[f"eval/{key}"] == pytest.approx(metrics[key]), key
    assert eval_run.summary["eval/kl_per_dim_values"] == pytest.approx(metrics["kl_per_dim"])
    row = eval_run.history[0]
    for name in ("reconstructions", "samples", "latent", "manifold", "interpolation"):
        assert row[f"eval/figures/{name}/_type"] == "image-file", name
    assert row["eval/latent/means_table/nrows"] == 10000 and row["eval/kl_per_dim_table/nrows"] == 2
    assert eval_run.config.keys() <= {"_wandb", "_wandb/visualize/eval/kl_per_dim",
                                      "_wandb/visualize/eval/latent/means"}  # training config left alone
    assert f"wandb sync --id {train_run.run_id}" in result.stdout


@pytest.mark.slow
def test_a_loose_model_file_gets_its_own_wandb_run_in_its_eval_folder(offline_run, tmp_path):
    source, _ = offline_run
    loose = tmp_path / "shared" / "model.pt"
    loose.parent.mkdir()
    shutil.copy(source / "last.pt", loose)
    result = python("evaluate.py", "--ckpt", str(loose), "--iwae-k", "2", "--no-figures", "--wandb", timeout=300)
    assert_ok(result)
    wandb_dir = loose.parent / "eval" / "wandb"
    assert f"{loose.parent} records no W&B run ({RUN_FILE}): the evaluation is logged as a new W&B run, its " \
           f"files in {wandb_dir}" in result.stdout
    assert sorted(p.name for p in loose.parent.iterdir()) == ["eval", "model.pt"]  # nothing else next to it
    (segment,) = offline_run_dirs(loose.parent / "eval")
    run = read_offline_run(segment)
    assert run.exit_code == 0 and run.summary["eval/iwae_k"] == 2


@pytest.mark.slow
def test_a_resumed_run_keeps_its_project_when_log_project_changes(offline_run, tmp_path, mnist_root):
    source, _ = offline_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, symlinks=True)
    overrides = [o for o in RUN_OVERRIDES if not o.startswith("train.epochs")] + ["train.epochs=3",
                                                                                   "log.project=elsewhere"]
    result = python(*train_cmd(run_dir, mnist_root, *overrides, wandb=True), timeout=300)
    assert_ok(result)
    first, second = (read_offline_run(d) for d in offline_run_dirs(run_dir))
    assert second.run_id == first.run_id and second.project == first.project == "vae-mnist"
    assert f"log.project=elsewhere ignored: this run directory's W&B run {first.run_id} is in project " \
           f"vae-mnist ({RUN_FILE})" in result.stdout
    assert json.loads((run_dir / RUN_FILE).read_text())["project"] == "vae-mnist"


@pytest.mark.slow
def test_a_sweep_agent_trains_the_sweep_configs_command_into_a_run_directory_of_its_own(tmp_path, mnist_root,
                                                                                       monkeypatch):
    """configs/sweeps/z_dim.yaml's command as `wandb agent` builds and starts it, by the agent's own code, for a run
    the sweep server would hand out (the server cannot run here: sweeps are online only). The run trains with the
    sweep's values, into runs/<config>-sweep-<sweep id>/<run id>, logging to the run id the agent was given."""
    from wandb.wandb_agent import Agent

    sweep = yaml.safe_load((REPO / "configs/sweeps/z_dim.yaml").read_text())
    work = tmp_path / "work"  # the agent's working directory: a checkout, with data/ (runs/ are written here)
    work.mkdir()
    for name in ("train.py", "vae", "configs"):
        (work / name).symlink_to(REPO / name)
    (work / "data").symlink_to(mnist_root)
    monkeypatch.chdir(work)
    for name, value in (("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"), ("WANDB_SWEEP_ID", "swp1"),
                        ("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path / "agent")), ("WANDB_RUN_ID", "-")):
        monkeypatch.setenv(name, value)  # the agent sets WANDB_RUN_ID itself; monkeypatch restores it after
    agent = Agent.__new__(Agent)
    agent._sweep_command, agent._function, agent._in_jupyter = sweep["command"], None, False
    agent._forward_signals, agent._run_processes = False, {}
    values = {"model.z_dim": 5, "train.epochs": 1, "data.train_subset": 500, "log.figures": False}
    agent._command_run({"run_id": "run00042", "program": sweep["program"],
                        "args": {key: {"value": value} for key, value in values.items()}})
    assert agent._run_processes["run00042"]._popen.wait(timeout=300) == 0
    run_dir = work / "runs" / "z2-sweep-swp1" / "run00042"
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    (segment,) = offline_run_dirs(run_dir)
    run = read_offline_run(segment)
    assert run.run_id == "run00042" and run.config["model"]["z_dim"] == 5 and run.exit_code == 0
    assert json.loads((run_dir / RUN_FILE).read_text())["id"] == "run00042"  # a resume continues that run


# ---------------------------------------------------------------------------------------------------------
# Several processes, W&B off, W&B broken


@pytest.mark.slow
def test_two_process_ddp_writes_one_offline_run_and_never_the_api_key(tmp_path, mnist_root):
    run_dir = tmp_path / "ddp"
    result = accelerate_launch("--multi_gpu", "--num_processes", "2",
                               *train_cmd(run_dir, mnist_root, "train.cpu=true", "log.figures=false", wandb=True),
                               env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}, timeout=300)
    assert_ok(result)
    segments = offline_run_dirs(run_dir)
    assert len(segments) == 1 and len(list((run_dir / "wandb").glob("*run-*"))) == 1
    run = read_offline_run(segments[0])
    assert run.steps == [10, 20, 30, 40]  # one rank logged, every 10 steps
    assert run.summary["num_processes"] == 2
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert run.rows_with("val/loss")[0]["val/loss"] == pytest.approx(metrics[0]["val/loss"])
    assert result.stdout.count("is logged offline (offline mode)") == 1  # printed by the main process only
    # the API key is nowhere: not in the run directory (config, W&B's files, logs), not in the output
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in result.stdout + result.stderr


NO_WANDB = """
import sys
from vae.config import load_config
from vae.training.loop import train
train(load_config("configs/debug.yaml", sys.argv[1:]))
assert "wandb" not in sys.modules, "wandb was imported"
print("wandb was never imported")
"""


@pytest.mark.slow
def test_wandb_false_never_imports_wandb(tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    result = python("-c", NO_WANDB, f"run.dir={run_dir}", f"data.root={mnist_root}", "log.wandb=false",
                    "log.figures=false", "data.train_subset=500")
    assert_ok(result)
    assert "wandb was never imported" in result.stdout
    assert not (run_dir / "wandb").exists() and not (run_dir / RUN_FILE).exists()
    assert "W&B" not in result.stdout


BROKEN = """
import runpy, sys
import wandb
from wandb.sdk.wandb_run import Run

def broken(*args, **kwargs):
    raise RuntimeError("W&B is broken (test)")

if sys.argv[1] == "init":
    wandb.init = broken
else:
    Run.log = broken
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("where, warning", [("init", "W&B could not start (RuntimeError: W&B is broken (test))"),
                                            ("log", "W&B failed while logging (RuntimeError: W&B is broken")])
def test_broken_wandb_does_not_stop_training(where, warning, tmp_path, mnist_root):
    run_dir = tmp_path / "r"
    result = python("-c", BROKEN, where, *train_cmd(run_dir, mnist_root, "data.train_subset=500",
                                                     "log.every_steps=2", wandb=True, figures=True)[1:],
                    env={"WANDB_MODE": "offline"}, timeout=300)
    assert_ok(result)
    assert result.stdout.count(warning) == 1 and result.stdout.count("going on without W&B") == 1
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    for name in ("summary.json", "last.pt", "loss.png", "samples.png", "latent.png"):
        assert (run_dir / name).is_file(), name
    assert "Traceback" not in result.stderr


# wandb.init held back until the training itself releases it: once it has logged its first train/* row ("end"),
# or once that row is logged and a SIGTERM has asked the run to stop ("stop"); or for two minutes ("hang", an
# online start without network), with a SIGTERM sent while the loop waits for it at the end of epoch 1. A
# Tracker.start that waited for wandb.init would never get to a training step: the init would wait in vain (until
# the timeout) and the events would come in the other order.
HELD_START = """
import atexit, os, runpy, signal, sys, threading
import wandb
from vae.cluster.preemption import StopRequest
from vae.tracking import Tracker

ending, events = sys.argv[1], []
logged, stopped = threading.Event(), threading.Event()
log, handle, init, wait = Tracker.log, StopRequest._handle, wandb.init, Tracker.wait_for_wandb

def log_and_tell(self, values, step, epoch_row=False):
    log(self, values, step, epoch_row)
    if "train/loss" in values and not logged.is_set():
        events.append(f"train/* of step {step} logged")
        logged.set()
        if ending == "stop":
            os.kill(os.getpid(), signal.SIGTERM)

def handle_and_tell(self, signum, frame):
    handle(self, signum, frame)
    events.append(f"{signal.Signals(signum).name} handled")
    stopped.set()

def held_init(*args, **kwargs):
    {"stop": stopped, "end": logged, "hang": threading.Event()}[ending].wait(timeout=120)
    run = init(*args, **kwargs)
    events.append("wandb.init returned")
    return run

def wait_and_tell(self, patience_s=None):
    if ending == "hang" and patience_s is None and not stopped.is_set() and self.starting is not None:
        events.append("waiting for W&B")
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    wait(self, patience_s)

Tracker.log, StopRequest._handle, wandb.init = log_and_tell, handle_and_tell, held_init
Tracker.wait_for_wandb = wait_and_tell
atexit.register(lambda: print("events:", " | ".join(events)))
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["end", "stop", "hang"])
def test_wandb_starts_while_training_and_gets_every_row_logged_before_it_was_ready(ending, tmp_path, mnist_root):
    """W&B's start does not hold the first training steps up, and what the run logged meanwhile reaches W&B, at its
    steps and in order: at the end of the epoch, or at a stop that came before W&B was ready (then also marked
    preempted)."""
    run_dir = tmp_path / "r"
    epochs = "train.epochs=2" if ending == "hang" else "train.epochs=1"  # "hang": the stop comes after epoch 1
    result = python("-c", HELD_START, ending, *train_cmd(run_dir, mnist_root, "log.every_steps=2", epochs,
                                                         wandb=True)[1:],
                    env={"WANDB_MODE": "offline"}, timeout=300)
    if ending == "hang":  # the stop is honoured at once: epoch 1's checkpoint first, W&B given up for this start
        assert "events: train/* of step 2 logged | waiting for W&B | SIGTERM handled" in result.stdout, result.stdout
        assert result.returncode == 143 and "stopped by SIGTERM" in result.stderr, result.stdout + result.stderr
        assert "W&B was still starting when a stop was asked for" in result.stdout, result.stdout
        assert "Traceback" not in result.stderr and not offline_run_dirs(run_dir), result.stderr
        assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1]
        assert (run_dir / "last.pt").exists()
        return
    stop = ["SIGTERM handled"] if ending == "stop" else []
    assert f"events: {' | '.join(['train/* of step 2 logged', *stop, 'wandb.init returned'])}" in result.stdout, \
        result.stdout + result.stderr
    (segment,) = offline_run_dirs(run_dir)
    run = read_offline_run(segment)
    assert result.stdout.count(f"W&B run {run.run_id} is logged offline (offline mode)") == 1
    assert run.config["train"]["epochs"] == 1 and run.config["log"]["every_steps"] == 2
    if ending == "stop":
        assert result.returncode == 143 and "stopped by SIGTERM at epoch 1, batch 2/40" in result.stderr, \
            result.stderr
        assert run.steps == [2] and run.record_kinds.get("preempting") == 1 and run.exit_code == 143
        return
    assert_ok(result)
    assert run.steps == list(range(2, STEPS_PER_EPOCH + 1, 2)) and run.exit_code == 0
    assert all(row["train/loss"] > 0 for row in run.rows_with("train/loss")) and len(run.rows_with("train/loss")) == 20
    assert run.metrics["val/*"]["step_metric"] == "epoch"  # defined while W&B was starting
    (epoch_row,) = run.rows_with("val/loss")
    assert epoch_row["_step"] == STEPS_PER_EPOCH
    assert epoch_row["val/loss"] == pytest.approx(read_jsonl(run_dir / "metrics.jsonl")[0]["val/loss"])


# ---------------------------------------------------------------------------------------------------------
# Credentials, found without network


CREDENTIALS = """
import os, pathlib
from urllib.parse import urlsplit
from wandb.sdk import wandb_setup
from vae.tracking import has_credentials

print("none:", has_credentials())
os.environ["WANDB_API_KEY"] = key = "k" * 40
print("env:", has_credentials())
del os.environ["WANDB_API_KEY"]
host = urlsplit(wandb_setup.singleton().settings.base_url).netloc  # what `wandb login` writes, for this host
netrc = pathlib.Path.home() / ".netrc"
netrc.write_text(f"machine {host}\\n  login user\\n  password {key}\\n")
netrc.chmod(0o600)
print("netrc:", has_credentials())
"""


@pytest.mark.slow
def test_credentials_are_found_without_network_or_prompt(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = python("-c", CREDENTIALS, env={"HOME": str(home)}, timeout=120)
    assert_ok(result)
    assert result.stdout.split() == ["none:", "False", "env:", "True", "netrc:", "True"]


# ---------------------------------------------------------------------------------------------------------
# Fast: the config keys, the step guard, the reader


MANY_ROWS = """
import sys, wandb
run = wandb.init(project="reader", dir=sys.argv[1], mode="offline", settings=wandb.Settings(silent=True))
for step in range(1, 1501):
    run.log({"x": step, "text": "abc" * (step % 50)}, step=step)
run.finish()
"""


@pytest.mark.slow
def test_reader_follows_records_across_blocks_of_a_real_file(tmp_path):
    assert_ok(python("-c", MANY_ROWS, str(tmp_path), timeout=120))
    (segment,) = offline_run_dirs(tmp_path)
    assert wandb_file(segment).stat().st_size > 4 * BLOCK
    run = read_offline_run(segment)
    assert run.steps == list(range(1, 1501)) and [row["x"] for row in run.history] == run.steps
    assert run.history[-1]["text"] == "abc" * (1500 % 50) and run.exit_code == 0


def test_log_config_keys():
    log = LogConfig()
    assert (log.wandb, log.project, log.entity, log.name, log.group, log.tags) == (True, "vae-mnist", None, None,
                                                                                    None, ())
    assert (log.images_every_epochs, log.latent_points, log.checkpoint_artifacts) == (5, 2000, False)
    assert log.trackers == log.active_trackers == ("wandb",)
    # log.wandb=false keeps meaning no W&B, whatever log.trackers says
    for overrides, active in ((["log.trackers=[tensorboard]"], ("tensorboard",)),
                              (["log.trackers=[wandb, tensorboard]"], ("wandb", "tensorboard")),
                              (["log.trackers=[wandb, tensorboard]", "log.wandb=false"], ("tensorboard",)),
                              (["log.wandb=false"], ()), (["log.trackers=[]"], ())):
        assert load_config(None, overrides).log.active_trackers == active, overrides
    cfg = load_config(REPO / "configs/debug.yaml", ["log.tags=[a, b2]", "log.entity=team", "log.name=x"])
    assert cfg.log.tags == ("a", "b2") and cfg.log.entity == "team" and cfg.log.name == "x"


@pytest.mark.parametrize("override, message", [
    ("log.tags=a", "log.tags: must be a list of strings"),
    ("log.tags=[null]", "log.tags[0]: must be a string"),
    ("log.tags=['']", "log.tags: must be a list of tags of 1 to 64 characters"),
    ("log.project=a/b", "log.project: must be a W&B project name"),
    ("log.images_every_epochs=-1", "log.images_every_epochs: must be >= 0"),
    ("log.latent_points=-5", "log.latent_points: must be >= 0"),
    ("log.wandb=yes please", "log.wandb: must be true or false"),
    ("log.trackers=[wandb, mlflow]", "log.trackers[1]: must be one of wandb, tensorboard (got 'mlflow')"),
    ("log.trackers=tensorboard", "log.trackers: must be a list of strings"),
    ("log.trackers=[tensorboard, tensorboard]", "log.trackers: must be a list without repeats"),
])
def test_log_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


class _FakeAccelerator:
    is_main_process = True

    def __init__(self, fail: bool = False):
        self.trackers, self.logged, self.fail = [], [], fail

    def log(self, values, step=None):
        if self.fail:
            raise OSError("disk full (test)")
        self.logged.append(step)

    def get_tracker(self, name):
        return self  # W&B's tracker alone: recorded alike


# A process whose wandb service is killed (as scancel kills it), then keeps logging until a call fails, then stops.
SERVICE_KILLED = """
import os, signal, sys, time
from pathlib import Path
from accelerate import Accelerator
from vae.config import LogConfig
from vae.console import RunConsole
from vae.tracking import Tracker

run_dir = Path(sys.argv[1])
tracker = Tracker.start(Accelerator(cpu=True, log_with="wandb"), RunConsole(True), log=LogConfig(),
                        run_name="service-killed", run_dir=run_dir, config={}, resumed=False)
tracker.log({"train/loss": 1.0}, step=1)
tracker.wait_for_wandb()  # W&B starts in the background: its service runs once the start is over
for task in Path(f"/proc/{os.getpid()}/task").iterdir():
    for child in (task / "children").read_text().split():
        os.kill(int(child), signal.SIGKILL)  # wandb's service: the process's only child
step = 2
while tracker.active and step < 200:
    tracker.log({"train/loss": 1.0}, step=step)
    step, _ = step + 1, time.sleep(0.05)
print("logging failed:", not tracker.active)
if sys.argv[2] == "stop":
    tracker.interrupted(preempted=True, exit_code=143)
else:
    tracker.end_training()
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["stop", "end"])
def test_a_dead_wandb_service_leaves_no_traceback_and_a_stop_still_closes_the_run_as_preempted(ending, tmp_path):
    """scancel kills wandb's service with the training; the next log call then often fails before the harness
    sees its own SIGTERM. The stop must still close the W&B run as preempted, and neither a stop nor the end of
    training may leave wandb's atexit hook to print a traceback about the dead service."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = python("-c", SERVICE_KILLED, str(run_dir), ending, timeout=120)
    assert result.returncode == 0 and "logging failed: True" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    if ending == "end":
        return
    segments = offline_run_dirs(run_dir)
    assert len(segments) == 2, segments  # the killed one (its last seconds lost with the service), the closing one
    closing = read_offline_run(segments[1])
    assert closing.run_id == json.loads((run_dir / RUN_FILE).read_text())["id"]
    assert closing.record_kinds.get("preempting") == 1 and closing.exit_code == 143


def test_steps_an_earlier_start_logged_are_not_logged_again():
    accelerator = _FakeAccelerator()
    tracker = Tracker(accelerator, RunConsole(False))
    tracker.run, tracker.logged_before, tracker.last_step = object(), 40, 40  # the crashed start reached step 40
    for step in (30, 40, 50, 50, 60):  # resumed from a checkpoint at step 20
        tracker.log({"train/loss": 1.0}, step=step)
    assert accelerator.logged == [50, 50, 60] and tracker.last_step == 60


@pytest.mark.parametrize("resumed_at, logged", [(80, [81, 90]), (40, [90])])
def test_an_epoch_row_at_the_step_a_run_resumed_from_is_logged_but_not_one_trained_again(resumed_at, logged):
    """The earlier start logged train/* at step 80: resumed from a stop after that step (epoch 2's last batch),
    epoch 2's row at step 80 is new, and goes to W&B one step later (a resumed W&B run drops rows at steps it
    holds; the row is charted against `epoch`); resumed from step 40, epoch 2 was trained and logged before."""
    accelerator = _FakeAccelerator()
    tracker = Tracker(accelerator, RunConsole(False))
    tracker.run, tracker.logged_before, tracker.last_step, tracker.resumed_at = object(), 80, 80, resumed_at
    tracker.log({"train/loss": 1.0}, step=80)
    tracker.log({"val/loss": 1.0}, step=80, epoch_row=True)
    tracker.log({"train/loss": 1.0}, step=90)
    assert accelerator.logged == logged


def test_a_failing_log_call_warns_once_and_stops_logging(capsys):
    accelerator = _FakeAccelerator(fail=True)
    tracker = Tracker(accelerator, RunConsole(True))
    tracker.run = object()
    for step in (10, 20, 30):
        tracker.log({"train/loss": 1.0}, step=step)
    assert not tracker.active
    out = capsys.readouterr().out
    assert out.count("W&B failed while logging (OSError: disk full (test)); going on without W&B") == 1


def test_reader_refuses_other_files_and_stops_at_a_cut(tmp_path):
    other = tmp_path / "x.wandb"
    other.write_bytes(b"not a wandb file at all")
    with pytest.raises(WandbFileError):
        list(iter_payloads(other))
    # a valid file cut in the middle of a record: the records before the cut are read
    def record(data: bytes, kind: int = 1) -> bytes:
        return struct.pack("<IHB", zlib.crc32(bytes([kind]) + data) & 0xFFFFFFFF, len(data), kind) + data

    cut = tmp_path / "cut.wandb"
    cut.write_bytes(struct.pack("<4sHB", b":W&B", 0xBEE1, 0) + record(b"one") + record(b"two")[:-1])
    assert list(iter_payloads(cut)) == [b"one"]
    # a record split into FIRST / MIDDLE / LAST chunks across a block boundary
    big = bytes(range(256)) * 200  # 51,200 bytes: more than a block
    head = BLOCK - 7 - 7  # what fits in the first block after the file and chunk headers
    rest = big[head:]
    middle, last = rest[: BLOCK - 7], rest[BLOCK - 7:]
    split = tmp_path / "split.wandb"
    split.write_bytes(struct.pack("<4sHB", b":W&B", 0xBEE1, 0) + record(big[:head], 2) + record(middle, 3)
                      + record(last, 4))
    assert list(iter_payloads(split)) == [big]
