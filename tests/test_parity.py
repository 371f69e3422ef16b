"""1, 2, 3 or 4 processes train the same model from the same config: the global batch is split over the
processes (unevenly when N does not divide it), the short last batch holds exactly the remaining images, and
every image gets the noise it gets in a 1-process run. Real gloo process groups on the CPU."""

import json

import pytest
import torch

from vae.storage.checkpoint import load_model_file

from .conftest import ACCELERATE_LAUNCH, assert_ok, read_jsonl, run_cmd

pytestmark = pytest.mark.slow

BATCH_SIZES = (50, 64)
ACCUMULATED = "25x2"  # 2 accumulated batches of 25: the same model as one batch of 50
DATA_SUBSET = 2010  # leaves a short last batch at 50 (10 images) and at 64 (26 images)
SCRIPT = "tests/scripts/parity_runs.py"


def _train_all(root, mnist_root, processes: int):
    launch = [*ACCELERATE_LAUNCH, "--num_processes", str(processes)]
    if processes > 1:
        launch.append("--multi_gpu")
    args = [str(root), str(mnist_root), str(DATA_SUBSET), *map(str, BATCH_SIZES), ACCUMULATED]
    result = run_cmd([*launch, SCRIPT, *args], timeout=900)
    assert_ok(result)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root):
    """trained(N): the root of the parity runs on N processes (trained once per module), and their output."""
    done = {}

    def on(processes: int):
        if processes not in done:
            root = tmp_path_factory.mktemp(f"parity-{processes}")
            done[processes] = root, _train_all(root, mnist_root, processes)
        return done[processes]

    return on


def _assert_same_model(run, alone, what: str) -> None:
    """The same model up to the order of float sums (DDP's all-reduce): over 32-41 Adam steps the differences
    stay at float32 rounding of the summed gradients, far below rtol 1e-4. Adam's moments hold the gradients
    themselves (its update nearly ignores their scale): equal moments mean each process's loss was scaled so that
    DDP's average is the gradient of the global batch's sum."""
    a, b = (load_model_file(r / "last.pt")["model"] for r in (alone, run))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")
    moments = [torch.load(next((r / "checkpoints").glob("step_*/optimizer.bin")), weights_only=True)["state"]
               for r in (alone, run)]
    for index, state in moments[0].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[1][index][key], state[key], rtol=1e-3, atol=1e-6, msg=what)


def _expected_shares(batch_size: int, processes: int) -> list[int]:
    """Images per process over the epoch: each global batch split as evenly as it goes, the first ranks taking
    one more (50 over 4: 13, 13, 12, 12)."""
    shares = [0] * processes
    for start in range(0, DATA_SUBSET, batch_size):
        size = min(batch_size, DATA_SUBSET - start)
        for rank in range(processes):
            shares[rank] += size // processes + (rank < size % processes)
    return shares


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_n_processes_train_the_1_process_model(processes, trained):
    root, result = trained(processes)
    assert result.stdout.count("epoch   1 ") == len(BATCH_SIZES) + 1  # only the main process prints
    for batch_size in BATCH_SIZES:
        alone, ddp = trained(1)[0] / f"b{batch_size}", root / f"b{batch_size}"
        summary = json.loads((ddp / "summary.json").read_text())
        assert summary["num_processes"] == processes
        assert len(set(summary["param_checksum_per_rank"])) == 1  # every rank ends with identical parameters
        _assert_same_model(ddp, alone, f"batch {batch_size}")
        row, alone_row = read_jsonl(ddp / "metrics.jsonl")[0], read_jsonl(alone / "metrics.jsonl")[0]
        assert row["samples_per_rank"] == _expected_shares(batch_size, processes)  # no repeats, no drops
        assert sum(row["samples_per_rank"]) == DATA_SUBSET == sum(alone_row["samples_per_rank"])
        assert row["train/loss"] == pytest.approx(alone_row["train/loss"], abs=1e-3)
        assert row["val/loss"] == pytest.approx(alone_row["val/loss"], abs=1e-3)
        assert row["val/n_images"] == 10000  # the whole test set, nothing counted twice
        env = json.loads((ddp / "environment.json").read_text())
        assert env["distributed_type"] == "DistributedType.MULTI_CPU" and env["dist_backend"] == "gloo"


@pytest.mark.parametrize("processes", [1, 2])
def test_accumulating_2_batches_of_25_trains_the_batch_50_model_with_one_all_reduce_per_update(processes, trained):
    """train.grad_accum_steps: the update of 2 batches of 25 is the update of one batch of 50, and DDP all-reduces
    the gradients once per update (accelerate's accumulate() skips the first batch's all-reduce)."""
    root = trained(processes)[0]
    accumulated, plain = root / f"b{ACCUMULATED}", trained(1)[0] / "b50"
    _assert_same_model(accumulated, plain, ACCUMULATED)
    row, plain_row = read_jsonl(accumulated / "metrics.jsonl")[0], read_jsonl(plain / "metrics.jsonl")[0]
    assert row["step"] == plain_row["step"] == 41  # updates: 2,010 images in batches of 50
    assert row["train/loss"] == pytest.approx(plain_row["train/loss"], abs=1e-3)
    if processes > 1:
        counts = [json.loads((r / "allreduces.json").read_text()) for r in (accumulated, root / "b50")]
        assert counts[0] == counts[1] > 0, f"all-reduces: {counts[0]} accumulating, {counts[1]} in batches of 50"
