"""The CUDA paths, on one GPU: precisions, data placement, compile, the CUDA graph, device moves of a full state,
evaluate.py on GPU against CPU, IWAE memory, no host sync inside the steps, W&B offline.

Skipped with the reason where CUDA is absent; with VAE_REQUIRE_GPU=1 (the GPU check sets it) a missing GPU fails
instead, so a GPU machine can never pass this file by skipping it. Run: `pytest -m gpu` or `make gpu-check`.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from .conftest import assert_ok, python, read_jsonl, train_cmd

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

if not torch.cuda.is_available():
    if os.environ.get("VAE_REQUIRE_GPU") == "1":
        raise RuntimeError("VAE_REQUIRE_GPU=1 but torch sees no CUDA device: the GPU tests cannot run here")
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False); set VAE_REQUIRE_GPU=1 to fail instead",
                allow_module_level=True)

QUIET = ("log.wandb=false", "log.figures=false")
SUBSET = "data.train_subset=4000"  # 80 steps of configs/debug.yaml's batch 50


def _train(run_dir, mnist_root, *overrides, config="configs/debug.yaml"):
    result = python(*train_cmd(run_dir, mnist_root, *QUIET, *overrides, config=config))
    assert_ok(result)
    return read_jsonl(run_dir / "metrics.jsonl")


def _environment(run_dir) -> dict:
    return json.loads((run_dir / "environment.json").read_text())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, mnist_root):
    """configs/debug.yaml on 4,000 images on the GPU in fp32: the reference the other tests compare with."""
    run_dir = tmp_path_factory.mktemp("gpu") / "fp32"
    rows = _train(run_dir, mnist_root, "train.mixed_precision=no", SUBSET)
    return run_dir, rows


def test_full_state_moves_from_gpu_to_cpu_and_back(tmp_path, mnist_root):
    gpu_first, cpu_first = tmp_path / "gpu_first", tmp_path / "cpu_first"
    _train(gpu_first, mnist_root, "train.epochs=1")
    moved = _train(gpu_first, mnist_root, "train.epochs=2", "train.cpu=true")
    assert [r["epoch"] for r in moved] == [1, 2] and _environment(gpu_first)["device"] == "cpu"
    _train(cpu_first, mnist_root, "train.epochs=1", "train.cpu=true")
    moved = _train(cpu_first, mnist_root, "train.epochs=2")
    assert [r["epoch"] for r in moved] == [1, 2] and _environment(cpu_first)["device"].startswith("cuda")
    assert moved[1]["val/loss"] < moved[0]["val/loss"]


def test_evaluate_gives_the_same_metrics_on_gpu_and_cpu(fp32_run, tmp_path):
    run_dir, _ = fp32_run
    metrics = {}
    for device, flags in (("gpu", ()), ("cpu", ("--cpu",))):
        out = tmp_path / f"{device}.json"
        assert_ok(python("evaluate.py", "--ckpt", str(run_dir / "last.pt"), "--iwae-k", "10", "--out", str(out),
                         "--no-figures", *flags))
        metrics[device] = json.loads(out.read_text())
    assert metrics["gpu"]["device"].startswith("cuda") and metrics["cpu"]["device"] == "cpu"
    # The per-image noise is drawn on the CPU from the image's index, so both score the same samples: what is
    # left is float32 summation order (stated tolerance: 0.01 nats per image).
    for key in ("nelbo", "recon", "kl", "iwae_nll"):
        assert metrics["gpu"][key] == pytest.approx(metrics["cpu"][key], abs=0.01), key
    assert metrics["gpu"]["active_units"] == metrics["cpu"]["active_units"]


def test_iwae_with_1000_samples_stays_in_bounded_memory(fp32_run, tmp_path):
    from vae.evaluation import evaluate

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
    from vae.training import train

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


@pytest.mark.parametrize("settings", [(), ("train.cuda_graph=true",),
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



def test_fp32_trains_on_the_gpu_with_the_data_on_the_device(fp32_run):
    run_dir, rows = fp32_run
    env = _environment(run_dir)
    assert env["device"].startswith("cuda") and env["mixed_precision"] == "no"
    assert rows[-1]["val/loss"] < 260 and rows[-1]["skipped_steps"] == 0


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
def test_cuda_graph_trains_like_eager(precision, tmp_path, mnist_root):
    # 2030 images: 40 full batches and a short one of 30 (run eagerly beside the graph); 2 epochs replay the
    # graph across an epoch boundary; the cosine schedule must reach the captured optimizer.
    settings = (f"train.mixed_precision={precision}", "data.train_subset=2030", "train.epochs=2",
                "train.lr_schedule=cosine")
    eager = _train(tmp_path / "eager", mnist_root, *settings)
    graphed = _train(tmp_path / "graph", mnist_root, *settings, "train.cuda_graph=true")
    for a, b in zip(eager, graphed, strict=True):
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=0.5 if precision == "no" else 2.0)
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=0.5 if precision == "no" else 2.0)
        assert b["samples_per_rank"] == a["samples_per_rank"] == [2030]
        assert b["lr"] == pytest.approx(a["lr"], abs=1e-7)  # the schedule reaches the captured Adam
    assert graphed[0]["lr"] == pytest.approx(5e-4, rel=0.05) and graphed[-1]["lr"] < 1e-7


def test_an_eager_run_resumes_under_the_cuda_graph_and_back(tmp_path, mnist_root):
    # A constant schedule: a cosine one would be stretched at each start (train.epochs grows) and differ.
    settings = ("train.mixed_precision=no", "data.train_subset=2030")
    straight = _train(tmp_path / "straight", mnist_root, *settings, "train.epochs=3")
    run_dir = tmp_path / "switched"
    _train(run_dir, mnist_root, *settings, "train.epochs=1")
    _train(run_dir, mnist_root, *settings, "train.epochs=2", "train.cuda_graph=true")
    switched = _train(run_dir, mnist_root, *settings, "train.epochs=3")
    assert [r["epoch"] for r in switched] == [1, 2, 3]
    for a, b in zip(straight, switched, strict=True):
        assert b["lr"] == pytest.approx(1e-3)
        assert b["val/loss"] == pytest.approx(a["val/loss"], abs=0.5)


def test_the_cuda_graph_refuses_gradient_accumulation_in_one_line(tmp_path, mnist_root):
    overrides = ("train.cuda_graph=true", "train.grad_accum_steps=2")
    result = python(*train_cmd(tmp_path / "r", mnist_root, *QUIET, *overrides))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: train.cuda_graph: and train.grad_accum_steps are exclusive"), result.stderr
