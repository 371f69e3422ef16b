"""The CUDA paths, on one GPU: precisions, data placement, compile, the CUDA graph (train.cuda_graph=auto takes it
on one GPU), device moves of a full state, evaluate.py on GPU against CPU, IWAE memory, no host sync inside the
steps, W&B offline; and DDP on the one GPU: two ranks over gloo train the one-rank model, in fp16 and bf16 too, stop
and resume on one rank, and evaluate, while NCCL's refusal of two ranks on one GPU is one error line.

Skipped with the reason where CUDA is absent; with VAE_REQUIRE_GPU=1 (the GPU check sets it) a missing GPU fails
instead, so a GPU machine can never pass this file by skipping it. Run: `pytest -m gpu` or `make gpu-check`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest
import torch

from vae.storage.checkpoint import complete_states, read_trainer_state

from .conftest import REPO, accelerate_launch, assert_ok, python, read_jsonl, train_cmd
from .test_parity import _assert_same_model

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

if not torch.cuda.is_available():
    if os.environ.get("VAE_REQUIRE_GPU") == "1":
        raise RuntimeError("VAE_REQUIRE_GPU=1 but torch sees no CUDA device: the GPU tests cannot run here")
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False); set VAE_REQUIRE_GPU=1 to fail instead",
                allow_module_level=True)

QUIET = ("log.wandb=false", "log.figures=false")
SUBSET = "data.train_subset=4000"  # 80 steps of configs/debug.yaml's batch 50
EAGER = "train.cuda_graph=false"  # where a test means the eager step: the default (auto) takes the graph on one GPU
EVALUATE = ("--iwae-k", "10", "--no-figures")


def _on_one_worker(group: str):
    """make gpu-check runs this file on several pytest-xdist workers with --dist=loadgroup: the tests of one group
    run on one worker, so the module fixture they share trains once there, not once per worker. The mark is known
    only where pytest-xdist is installed (pytest runs with --strict-markers)."""
    return pytest.mark.xdist_group(group) if importlib.util.find_spec("xdist") else (lambda test: test)


def _train(run_dir, mnist_root, *overrides, config="configs/debug.yaml"):
    result = python(*train_cmd(run_dir, mnist_root, *QUIET, *overrides, config=config))
    assert_ok(result)
    return read_jsonl(run_dir / "metrics.jsonl")


def _environment(run_dir) -> dict:
    return json.loads((run_dir / "environment.json").read_text())


def _step(result) -> str:
    """The training step the run's first line names: 'CUDA graph (auto: ...)', 'eager (...)'."""
    header = next(line for line in result.stdout.splitlines() if "run directory " in line)
    return header.rsplit("| step: ", 1)[1].strip()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, mnist_root):
    """configs/debug.yaml on 4,000 images on the GPU in fp32, eager: the reference the other tests compare with."""
    run_dir = tmp_path_factory.mktemp("gpu") / "fp32"
    rows = _train(run_dir, mnist_root, "train.mixed_precision=no", EAGER, SUBSET)
    return run_dir, rows


@pytest.fixture(scope="module")
def gpu_metrics(fp32_run, tmp_path_factory) -> dict:
    """evaluate.py on the fp32 run, one process on the GPU: what the CPU and two ranks must give."""
    out = tmp_path_factory.mktemp("evaluate") / "gpu.json"
    assert_ok(python("evaluate.py", "--ckpt", str(fp32_run[0] / "last.pt"), *EVALUATE, "--out", str(out)))
    return json.loads(out.read_text())


def test_full_state_moves_from_gpu_to_cpu_and_back(tmp_path, mnist_root):
    gpu_first, cpu_first = tmp_path / "gpu_first", tmp_path / "cpu_first"
    _train(gpu_first, mnist_root, "train.epochs=1")
    moved = _train(gpu_first, mnist_root, "train.epochs=2", "train.cpu=true")
    assert [r["epoch"] for r in moved] == [1, 2] and _environment(gpu_first)["device"] == "cpu"
    _train(cpu_first, mnist_root, "train.epochs=1", "train.cpu=true")
    moved = _train(cpu_first, mnist_root, "train.epochs=2")
    assert [r["epoch"] for r in moved] == [1, 2] and _environment(cpu_first)["device"].startswith("cuda")
    assert moved[1]["val/loss"] < moved[0]["val/loss"]


@_on_one_worker("fp32")
def test_evaluate_gives_the_same_metrics_on_gpu_and_cpu(fp32_run, gpu_metrics, tmp_path):
    run_dir, _ = fp32_run
    out = tmp_path / "cpu.json"
    assert_ok(python("evaluate.py", "--ckpt", str(run_dir / "last.pt"), *EVALUATE, "--out", str(out), "--cpu"))
    metrics = {"gpu": gpu_metrics, "cpu": json.loads(out.read_text())}
    assert metrics["gpu"]["device"].startswith("cuda") and metrics["cpu"]["device"] == "cpu"
    # The per-image noise is drawn on the CPU from the image's index, so both score the same samples: what is
    # left is float32 summation order (stated tolerance: 0.01 nats per image).
    for key in ("nelbo", "recon", "kl", "iwae_nll"):
        assert metrics["gpu"][key] == pytest.approx(metrics["cpu"][key], abs=0.01), key
    assert metrics["gpu"]["active_units"] == metrics["cpu"]["active_units"]


@_on_one_worker("fp32")
def test_iwae_with_1000_samples_stays_in_bounded_memory(fp32_run, tmp_path):
    from vae.evaluation.scoring import evaluate

    run_dir, _ = fp32_run
    torch.cuda.reset_peak_memory_stats()
    results = evaluate(run_dir / "last.pt", iwae_k=1000, batch_size=500, out=tmp_path / "m.json",
                       out_dir=tmp_path, figures=False)
    peak = torch.cuda.max_memory_allocated()
    assert results["iwae_nll"] <= results["nelbo"] + 1.0  # the bound tightens with k
    # Decoded 128 samples at a time: 500 x 128 x 784 floats (~200 MB) a chunk, a few such tensors at once.
    assert peak < 3 * 2**30, f"peak GPU memory {peak / 2**30:.2f} GiB"


def _sync_warnings(run_dir, mnist_root, train_subset: int, every_steps: int, settings: tuple[str, ...]) -> int:
    """Host-device syncs warned about by torch during a whole in-process run."""
    from accelerate.state import AcceleratorState

    from vae.config import load_config
    from vae.training.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = load_config("configs/debug.yaml", [*QUIET, f"run.dir={run_dir}", f"data.root={mnist_root}",
                                             f"data.train_subset={train_subset}", f"log.every_steps={every_steps}",
                                             "train.mixed_precision=no", *settings])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("settings", [(EAGER,), ("train.cuda_graph=true",),
                                      ("train.ema_decay=0.999", "train.grad_accum_steps=2", "train.batch_size=25")],
                         ids=["eager", "cuda_graph", "ema_and_accumulation"])
def test_steps_between_two_checks_make_no_host_sync(settings, tmp_path, mnist_root):
    # The same run shape twice: 2 checks (every_steps) and one epoch each, but 20 steps in one and 200 in the
    # other. Whatever syncs at set-up, checks, the test pass and checkpoints is the same in both; one sync per
    # step would add 180.
    short = _sync_warnings(tmp_path / "short", mnist_root, train_subset=1000, every_steps=10, settings=settings)
    long = _sync_warnings(tmp_path / "long", mnist_root, train_subset=10000, every_steps=100, settings=settings)
    assert short > 0, "torch reported no sync at all: the sync debug mode did not work"
    assert long - short < 10, f"{long - short} more syncs in 180 more steps"


def test_wandb_offline_on_the_gpu(tmp_path, mnist_root):
    pytest.importorskip("wandb", reason="wandb is not installed on this machine")
    run_dir = tmp_path / "wandb"
    result = python(*train_cmd(run_dir, mnist_root, "log.wandb=true", "log.figures=false"),
                    env={"WANDB_MODE": "offline"})
    assert_ok(result)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))



@_on_one_worker("fp32")
def test_fp32_trains_on_the_gpu_with_the_data_on_the_device(fp32_run):
    run_dir, rows = fp32_run
    env = _environment(run_dir)
    assert env["device"].startswith("cuda") and env["mixed_precision"] == "no"
    assert rows[-1]["val/loss"] < 260 and rows[-1]["skipped_steps"] == 0


@_on_one_worker("fp32-precision")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32(precision, fp32_run, tmp_path, mnist_root):
    _, reference = fp32_run
    rows = _train(tmp_path / precision, mnist_root, f"train.mixed_precision={precision}", SUBSET)
    assert _environment(tmp_path / precision)["mixed_precision"] == precision
    # bf16 rounds activations only; fp16 also loses the updates its scaler skips while it finds its scale
    # (about a dozen of these 80 steps), so it lags further behind this early in training.
    assert abs(rows[-1]["val/loss"] - reference[-1]["val/loss"]) < (5.0 if precision == "bf16" else 25.0)
    if precision == "fp16":
        # The loss scaler starts at 2**16: the summed -ELBO's gradients overflow fp16, so its first updates are
        # skipped and counted. Without a scaler nothing would be skipped.
        assert rows[-1]["skipped_steps"] >= 1
    else:
        assert rows[-1]["skipped_steps"] == 0


def test_data_on_the_host_trains_the_same_model(fp32_run, tmp_path, mnist_root):
    _, on_device = fp32_run
    on_host = _train(tmp_path / "host", mnist_root, "train.mixed_precision=no", "data.on_device=false", SUBSET)
    # Same batches, same noise, same kernels: only where the uint8 images live differs.
    assert on_host[-1]["val/loss"] == pytest.approx(on_device[-1]["val/loss"], abs=1e-3)


def test_compile_trains_like_eager(fp32_run, tmp_path, mnist_root):
    _, eager = fp32_run
    compiled = _train(tmp_path / "compiled", mnist_root, "train.mixed_precision=no", "train.compile=true", SUBSET)
    assert compiled[-1]["val/loss"] == pytest.approx(eager[-1]["val/loss"], abs=1.0)  # fused kernels reorder sums


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_auto_takes_the_cuda_graph_on_one_gpu_and_it_trains_like_eager(precision, tmp_path, mnist_root):
    # 2030 images: 40 full batches and a short one of 30 (run eagerly beside the graph); 2 epochs replay the
    # graph across an epoch boundary; the cosine schedule must reach the captured optimizer.
    settings = (f"train.mixed_precision={precision}", "data.train_subset=2030", "train.epochs=2",
                "train.lr_schedule=cosine")
    eager = _train(tmp_path / "eager", mnist_root, *settings, EAGER)
    result = python(*train_cmd(tmp_path / "graph", mnist_root, *settings))  # train.cuda_graph: auto, the default
    assert_ok(result)
    step = _step(result)
    assert step.startswith("CUDA graph (auto: ") and ("fp32" if precision == "no" else "bf16") in step, step
    graphed = read_jsonl(tmp_path / "graph" / "metrics.jsonl")
    for a, b in zip(eager, graphed, strict=True):
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=0.5 if precision == "no" else 2.0)
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=0.5 if precision == "no" else 2.0)
        assert b["samples_per_rank"] == a["samples_per_rank"] == [2030]
        assert b["lr"] == pytest.approx(a["lr"], abs=1e-7)  # the schedule reaches the captured Adam
    assert graphed[0]["lr"] == pytest.approx(5e-4, rel=0.05) and graphed[-1]["lr"] < 1e-7


def test_an_eager_run_resumes_under_the_cuda_graph_and_back(tmp_path, mnist_root):
    # A constant schedule: a cosine one would be stretched at each start (train.epochs grows) and differ.
    settings = ("train.mixed_precision=no", "data.train_subset=2030")
    straight = _train(tmp_path / "straight", mnist_root, *settings, EAGER, "train.epochs=3")
    run_dir = tmp_path / "switched"
    _train(run_dir, mnist_root, *settings, EAGER, "train.epochs=1")
    _train(run_dir, mnist_root, *settings, "train.epochs=2", "train.cuda_graph=true")
    switched = _train(run_dir, mnist_root, *settings, EAGER, "train.epochs=3")
    assert [r["epoch"] for r in switched] == [1, 2, 3]
    for a, b in zip(straight, switched, strict=True):
        assert b["lr"] == pytest.approx(1e-3)
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=0.5)


def test_the_cuda_graph_refuses_gradient_accumulation_in_one_line(tmp_path, mnist_root):
    overrides = ("train.cuda_graph=true", "train.grad_accum_steps=2")
    result = python(*train_cmd(tmp_path / "r", mnist_root, *QUIET, *overrides))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: train.cuda_graph: and train.grad_accum_steps are exclusive"), result.stderr


# ---------------------------------------------------------------------------------------------------------
# DDP on the one GPU. Accelerate puts local rank r on cuda:(r % GPUs), so two ranks share cuda:0; NCCL refuses
# that, gloo all-reduces the CUDA gradients through the host. Every DDP path of the harness runs, NCCL aside.

TWO_RANKS = ("--multi_gpu", "--num_processes", "2")
GLOO = "train.dist_backend=gloo"
DDP_IMAGES = "data.train_subset=2010"  # as tests/test_parity.py: 40 batches of 50 and a short one of 10

# sitecustomize.py for the two-rank trainings: every process writes the device Accelerate gave it and the CUDA
# device current in it to $VAE_TEST_DEVICES/rank-<r>.json (environment.json holds the main process's alone).
_RECORD_DEVICES = """import json
import os

import accelerate
import torch

_init = accelerate.Accelerator.__init__


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    with open(os.path.join(os.environ["VAE_TEST_DEVICES"], f"rank-{self.process_index}.json"), "w") as f:
        json.dump({"device": str(self.device), "current_device": torch.cuda.current_device()}, f)


accelerate.Accelerator.__init__ = __init__
"""


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, mnist_root):
    """configs/debug.yaml on 2,010 images, one process, fp32, the eager step: the model two ranks must train."""
    run_dir = tmp_path_factory.mktemp("one-rank") / "run"
    _train(run_dir, mnist_root, "train.mixed_precision=no", EAGER, DDP_IMAGES)
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, mnist_root):
    """two_ranks(precision): the same on two gloo ranks sharing the GPU, train.cuda_graph left to auto (trained
    once per module and precision): its run directory, the launch's output, and {rank: the device it recorded}."""
    done = {}

    def on(precision: str):
        if precision not in done:
            root = tmp_path_factory.mktemp(f"two-ranks-{precision}")
            (root / "hook").mkdir()
            (root / "hook" / "sitecustomize.py").write_text(_RECORD_DEVICES)
            (root / "devices").mkdir()
            result = accelerate_launch(*TWO_RANKS, *train_cmd(root / "run", mnist_root, GLOO, DDP_IMAGES,
                                                              f"train.mixed_precision={precision}"),
                                       env={"PYTHONPATH": f"{root / 'hook'}:{REPO}",
                                            "VAE_TEST_DEVICES": str(root / "devices")})
            assert_ok(result)
            devices = {int(path.stem.removeprefix("rank-")): json.loads(path.read_text())
                       for path in (root / "devices").glob("rank-*.json")}
            done[precision] = root / "run", result, devices
        return done[precision]

    return on


@_on_one_worker("ddp")
def test_two_ranks_on_one_gpu_train_the_one_rank_model(two_ranks, one_rank):
    run_dir, _, _ = two_ranks("no")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["param_checksum_per_rank"])) == 1
    # test_parity.py's tolerance: DDP's all-reduce only reorders float sums
    _assert_same_model(run_dir, one_rank, "2 gloo ranks on one GPU against 1 rank")
    row, alone = (read_jsonl(r / "metrics.jsonl")[0] for r in (run_dir, one_rank))
    assert row["samples_per_rank"] == [1005, 1005]  # 40 batches of 25 + 5 each: no image twice, none dropped
    for key in ("train/loss", "val/loss"):
        assert row[key] == pytest.approx(alone[key], abs=1e-3), key


@_on_one_worker("ddp")
def test_two_ranks_share_cuda_0_over_gloo_and_auto_takes_the_eager_step(two_ranks):
    run_dir, result, devices = two_ranks("no")
    env = _environment(run_dir)
    assert (env["num_processes"], env["dist_backend"], env["device"]) == (2, "gloo", "cuda:0")
    assert env["distributed_type"] == "DistributedType.MULTI_GPU"
    assert devices == {rank: {"device": "cuda:0", "current_device": 0} for rank in (0, 1)}
    nccl = torch.cuda.nccl.version()  # recorded although gloo ran: what the machine's DDP would use
    assert env["nccl_version"] == (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    step = _step(result)
    assert step.startswith("eager (auto: ") and "2 processes" in step, step


@_on_one_worker("ddp-precision")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_two_ranks_train_in_mixed_precision_like_fp32(precision, two_ranks):
    fp32_dir, _, _ = two_ranks("no")
    run_dir, _, _ = two_ranks(precision)
    assert _environment(run_dir)["mixed_precision"] == precision
    # Both ranks end alike: under fp16 they skip the same overflowing steps (the all-reduced gradients are equal)
    assert len(set(json.loads((run_dir / "summary.json").read_text())["param_checksum_per_rank"])) == 1
    rows, reference = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(fp32_dir / "metrics.jsonl")
    # As test_mixed_precision_trains_like_fp32 (a nan fails it too): bf16 rounds activations only, fp16 also loses
    # the updates its scaler skips while it finds its scale.
    assert abs(rows[-1]["val/loss"] - reference[-1]["val/loss"]) < (5.0 if precision == "bf16" else 25.0)
    assert abs(rows[-1]["train/loss"] - reference[-1]["train/loss"]) < (5.0 if precision == "bf16" else 25.0)


@_on_one_worker("ddp")
def test_two_ranks_stopped_mid_epoch_resume_on_one_rank_to_the_one_rank_model(one_rank, tmp_path, mnist_root):
    run_dir = tmp_path / "moved"
    settings = (GLOO, DDP_IMAGES, "train.mixed_precision=no", EAGER)  # eager: the one-rank model, to the ulp
    # Rank 0 sends itself SIGTERM right after step 20 of 41 (tests/fault_injection), a step at which the ranks
    # check together for a stop (every 10): both stop there, mid-epoch, with a checkpoint.
    stopped = accelerate_launch(*TWO_RANKS, *train_cmd(run_dir, mnist_root, *settings),
                                env={"PYTHONPATH": f"{REPO / 'tests' / 'fault_injection'}:{REPO}",
                                     "VAE_TEST_SIGNAL_AT_STEP": "0:20:SIGTERM"})
    assert stopped.returncode != 0
    assert "error: stopped by SIGTERM at epoch 1, batch 20/41" in stopped.stderr, stopped.stderr[-3000:]
    assert "[rank0]: Traceback" not in stopped.stderr and "[rank1]: Traceback" not in stopped.stderr
    state = read_trainer_state(complete_states(run_dir)[-1][1])
    assert (state["epoch"], state["batches_done"]) == (1, 20)
    resumed = python(*train_cmd(run_dir, mnist_root, *settings))  # the same command, without the launcher
    assert_ok(resumed)
    assert "resuming" in resumed.stdout
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1] and rows[0]["samples_per_rank"] == [1010]  # the 20 x 50 + 10 left
    _assert_same_model(run_dir, one_rank, "stopped on 2 ranks, resumed on 1")


@_on_one_worker("fp32")
def test_evaluate_on_two_ranks_gives_the_one_rank_numbers(fp32_run, gpu_metrics, tmp_path):
    out = tmp_path / "two.json"
    assert_ok(accelerate_launch(*TWO_RANKS, "evaluate.py", "--ckpt", str(fp32_run[0] / "last.pt"), *EVALUATE,
                                "--out", str(out), "--dist-backend", "gloo"))
    two = json.loads(out.read_text())
    assert (two["num_processes"], two["n_images"], two["device"]) == (2, 10000, "cuda:0")
    # Each image's noise is drawn from its index: both score the same samples. Batches of 250 a rank instead of
    # 500 may change cuBLAS's summation order: rel 1e-5 (0.002 nats at 150).
    for key in ("nelbo", "recon", "kl", "iwae_nll"):
        assert two[key] == pytest.approx(gpu_metrics[key], rel=1e-5), key
    assert two["active_units"] == gpu_metrics["active_units"]


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with several GPUs each rank gets one: NCCL applies")
def test_two_ranks_on_one_gpu_without_gloo_stop_in_one_error_line(tmp_path, mnist_root):
    # train.dist_backend left to auto: Accelerate's choice on GPUs is NCCL, which refuses two ranks on one GPU (at
    # the first collective, deep in a run); the launch check stops both before anything is trained.
    result = accelerate_launch(*TWO_RANKS, *train_cmd(tmp_path / "r", mnist_root))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NCCL" in errors[0] and "train.dist_backend=gloo" in errors[0], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
