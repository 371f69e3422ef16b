"""TensorBoard (log.trackers=[tensorboard]): real trainings read back with TensorBoard's own reader, a resume that
trains logged steps again, the missing package, a failing writer. W&B with TensorBoard: tests/test_wandb.py."""

import shutil

import pytest
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from vae.config import LogConfig
from vae.console import RunConsole
from vae.tracking import RUN_FILE, Tracker
from vae.tracking.tensorboard_backend import MISSING

from .conftest import REPO, assert_ok, python, read_jsonl, train_cmd
from .wandb_records import offline_run_dirs, read_offline_run

STEPS_PER_EPOCH = 40  # configs/debug.yaml: 2,000 images, global batch 50
FIGURES = ("reconstructions", "samples", "latent", "manifold", "interpolation")
# train/* every 15 steps, figures every 2 epochs (epoch 1 has none); two full states kept, so that a test can
# take the newest away (tests/test_tensorboard.py::test_a_resume_that_trains_logged_steps_again...)
OVERRIDES = ["log.trackers=[tensorboard]", "log.every_steps=15", "log.images_every_epochs=2",
             "train.keep_checkpoints=2"]


def read_events(folder) -> EventAccumulator:
    """Every event of the folder's event files, merged as TensorBoard merges them (0: keep all of each kind)."""
    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def hparams_of(events: EventAccumulator) -> dict:
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.string_value if value.HasField("string_value") else value.number_value
            for key, value in values.items()}


# With log.wandb left at its default (true): log.trackers alone decides that W&B is off.
WITHOUT_WANDB = """
import sys
from vae.config import load_config
from vae.training.loop import train
train(load_config("configs/debug.yaml", sys.argv[1:]))
assert "wandb" not in sys.modules, "wandb was imported"
print("wandb was never imported")
"""


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, mnist_root):
    run_dir = tmp_path_factory.mktemp("tensorboard") / "run"
    result = python("-c", WITHOUT_WANDB, f"run.dir={run_dir}", f"data.root={mnist_root}", "train.epochs=2",
                    *OVERRIDES, timeout=300)
    assert_ok(result)
    return run_dir, result


@pytest.mark.slow
def test_tensorboard_alone_holds_the_scalars_figures_and_config(tensorboard_run):
    run_dir, result = tensorboard_run
    assert "wandb was never imported" in result.stdout
    assert not (run_dir / "wandb").exists() and not (run_dir / RUN_FILE).exists() and "W&B" not in result.stdout
    assert result.stdout.count(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}") == 1
    events = read_events(run_dir / "tensorboard")
    # train/* every 15 steps, the epoch's numbers at its last step
    for tag in ("train/loss", "train/recon", "train/kl", "train/lr", "train/samples_per_s"):
        assert scalar_steps(events, tag) == [15, 30, 45, 60, 75], tag
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for tag, key in (("val/loss", "val/loss"), ("val/kl", "val/kl"), ("train/epoch_loss", "train/loss"),
                     ("perf/samples_per_s", "samples_per_s")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [row["step"] for row in metrics] == [40, 80], tag
        assert [p.value for p in points] == pytest.approx([row[key] for row in metrics], rel=1e-6), tag
    assert [p.value for p in events.Scalars("epoch")] == [1, 2]
    for point in events.Scalars("train/loss"):
        assert 100 < point.value < 600
    # the figures of the last epoch only (images_every_epochs=2), as PNG images
    for name in FIGURES:
        (image,) = events.Images(f"figures/{name}")
        assert image.step == 80 and image.encoded_image_string.startswith(b"\x89PNG") and image.width > 200, name
    # the resolved config, flattened, as hparams
    config = hparams_of(events)
    assert config["train.epochs"] == 2 and config["model.z_dim"] == 2 and config["model.hidden"] == "[400]"
    assert config["log.trackers"] == '["tensorboard"]' and config["run.dir"] == str(run_dir)
    assert config["log.wandb"] == "true" and config["log.entity"] == "null"


@pytest.mark.slow
def test_a_resume_that_trains_logged_steps_again_does_not_log_them_twice(tensorboard_run, tmp_path, mnist_root):
    """A run killed after logging steps its last checkpoint does not hold trains them again when it resumes: as
    here, where the newest full state (epoch 2's) is gone and the run resumes from epoch 1's, with one more
    epoch to train. The resumed start writes a second event file into the same folder; TensorBoard merges the
    two, and no step is there twice or out of order."""
    source, _ = tensorboard_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert newest.name.endswith(f"{2 * STEPS_PER_EPOCH:08d}")
    shutil.rmtree(newest)
    result = python(*train_cmd(run_dir, mnist_root, "train.epochs=3", *OVERRIDES), timeout=300)
    assert_ok(result)
    assert "resuming" in result.stdout
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = read_events(run_dir / "tensorboard")
    assert scalar_steps(events, "train/loss") == [15, 30, 45, 60, 75, 90, 105, 120]
    assert scalar_steps(events, "val/loss") == [40, 80, 120]
    assert [image.step for image in events.Images("figures/samples")] == [80, 120]  # epoch 3 is the last
    # what the first start logged stays (epoch 2 trained twice: the first time's numbers are kept)
    first = read_events(source / "tensorboard")
    assert [p.value for p in events.Scalars("val/loss")][:2] == [p.value for p in first.Scalars("val/loss")]


@pytest.mark.slow
def test_a_stop_after_an_epochs_last_batch_still_logs_that_epochs_row_when_it_resumes(tmp_path, mnist_root):
    """SIGTERM right after step 40, epoch 1's last batch, whose train/* was logged (every 10 steps): the
    checkpoint says "batch 40/40" and the resumed start scores epoch 1 at step 40, which that start's tracker
    must log although the folder holds step 40 already."""
    run_dir = tmp_path / "run"
    args = train_cmd(run_dir, mnist_root, "train.epochs=2", "log.trackers=[wandb, tensorboard]", "log.every_steps=10",
                     "log.images_every_epochs=1", wandb=True)
    stopped = python(*args, env={"PYTHONPATH": f"{REPO / 'tests' / 'fault_injection'}:{REPO}",
                                 "VAE_TEST_SIGNAL_AT_STEP": f"0:{STEPS_PER_EPOCH}:SIGTERM"})
    assert stopped.returncode == 143 and f"batch {STEPS_PER_EPOCH}/{STEPS_PER_EPOCH}" in stopped.stderr, stopped.stderr
    assert_ok(python(*args))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    # epoch 1's speed and time are of its training before the stop (the resumed start trained none of it)
    assert rows[0]["samples_per_s"] > 0 and rows[0]["epoch_time_s"] > 2000 / rows[0]["samples_per_s"] * 0.999
    events = read_events(run_dir / "tensorboard")
    assert scalar_steps(events, "val/loss") == scalar_steps(events, "epoch") == [40, 80]
    assert [image.step for image in events.Images("figures/samples")] == [40, 80]
    assert scalar_steps(events, "train/loss") == [10, 20, 30, 40, 50, 60, 70, 80]  # step 40 once
    # W&B (offline: one folder per start): epoch 1's row in the resumed start, one step after the last one held
    first, resumed = (read_offline_run(folder) for folder in offline_run_dirs(run_dir))
    assert [row["epoch"] for row in first.rows_with("val/loss")] == []
    assert [(row["_step"], row["epoch"]) for row in resumed.rows_with("val/loss")] == [(41, 1), (80, 2)]
    assert [row["_step"] for row in resumed.rows_with("figures/samples/_type")] == [41, 80]


@pytest.mark.slow
def test_a_missing_tensorboard_package_is_one_line_before_training(tmp_path, mnist_root):
    """A `tensorboard` package that cannot be imported, first on the path, hides the installed one from torch's
    SummaryWriter (which imports it) and from the harness alike."""
    hidden = tmp_path / "hidden" / "tensorboard"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('tensorboard is hidden by the test')\n")
    run_dir = tmp_path / "run"
    result = python(*train_cmd(run_dir, mnist_root, "log.trackers=[wandb, tensorboard]"), timeout=120,
                    env={"PYTHONPATH": str(hidden.parent)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: {MISSING}"
    assert "pip install tensorboard" in MISSING and "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()  # before anything: not even the run directory


# ---------------------------------------------------------------------------------------------------------
# Fast: the tracker on its own, in this process


def _tracker(run_dir) -> Tracker:
    run_dir.mkdir(exist_ok=True)
    return Tracker.start(Accelerator(cpu=True), RunConsole(True), log=LogConfig(trackers=("tensorboard",)),
                         run_name="t", run_dir=run_dir, config={"train": {"lr": 0.001}}, resumed=False)


def test_a_stop_closes_the_event_file_with_every_step_in_it(tmp_path):
    tracker = _tracker(tmp_path / "run")
    tensorboard = tracker.tensorboard
    assert tensorboard is not None and tracker.accelerator.trackers[0] is tensorboard
    for step in (10, 20, 30):
        tracker.log({"train/loss": 100.0 - step}, step=step)
    tracker.interrupted(preempted=True, exit_code=143)
    assert tensorboard.writer is None and tensorboard not in tracker.accelerator.trackers
    assert not tracker.logging
    tracker.log({"train/loss": 1.0}, step=40)  # after the stop: nothing, and no error
    events = read_events(tmp_path / "run" / "tensorboard")
    assert scalar_steps(events, "train/loss") == [10, 20, 30]


def test_a_failing_event_file_warns_once_and_training_goes_on(tmp_path, capsys):
    tracker = _tracker(tmp_path / "run")
    writer = tracker.tensorboard.writer
    tracker.log({"train/loss": 1.0}, step=10)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (test)")

    writer.add_scalar = disk_full
    for step in (20, 30, 40):
        tracker.log({"train/loss": 1.0}, step=step)
    tracker.end_training()  # closing after the failure: no error either
    out = capsys.readouterr().out
    assert out.count("TensorBoard failed while logging (OSError: [Errno 28] No space left on device (test)); "
                     "going on without TensorBoard") == 1, out
    assert scalar_steps(read_events(tmp_path / "run" / "tensorboard"), "train/loss") == [10]


def test_a_start_that_does_not_resume_moves_an_earlier_starts_events_aside(tmp_path):
    for _ in range(2):  # the first start crashed before its first checkpoint: the second starts from step 0
        tracker = _tracker(tmp_path / "run")
        tracker.log({"train/loss": 1.0}, step=10)
        tracker.end_training()
    folder = tmp_path / "run" / "tensorboard"
    (earlier,) = folder.glob("earlier-*")
    assert scalar_steps(read_events(folder), "train/loss") == [10]
    assert scalar_steps(read_events(earlier), "train/loss") == [10]
