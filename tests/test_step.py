"""The optimizer and schedule as train() builds them, stepped in-process on the CPU (no training run)."""

import math
import warnings

import pytest
import torch
from accelerate import Accelerator

from vae.config import ConfigError, load_config
from vae.launch import choose_step
from vae.model import VAE
from vae.step import make_train_step, prepare_optimization

STEPS = 4


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_schedule_sees_every_adam_step_so_torch_never_warns_of_the_wrong_order(schedule):
    cfg = load_config("configs/debug.yaml", [f"train.lr_schedule={schedule}", "train.batch_size=4"])
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = prepare_optimization(VAE.from_config(cfg.model), cfg.train, accelerator,
                                                       total_steps=STEPS, cuda_graph=False)
    images = torch.randint(0, 256, (8, 784), dtype=torch.uint8)
    step = make_train_step(False, model, optimizer, accelerator, images, cfg.model.z_dim, full_batch=4)
    with warnings.catch_warnings():
        # torch's "Detected call of `lr_scheduler.step()` before `optimizer.step()`" becomes a failure
        warnings.simplefilter("error")
        for _ in range(2):
            assert step(torch.arange(4), 4, (0, 4))
            if scheduler is not None:
                scheduler.step()
    expected = cfg.train.lr * (1 + math.cos(math.pi * 2 / STEPS)) / 2 if schedule == "cosine" else cfg.train.lr
    assert step.lr == pytest.approx(expected)
    assert (scheduler is None) == (schedule == "constant")


GRAPH_CASES = [  # (device, processes, mixed precision, overrides) -> the step auto chooses, and why
    ("cuda", 1, "no", (), "step: CUDA graph (auto: one CUDA process, fp32)"),
    ("cuda", 1, "bf16", (), "step: CUDA graph (auto: one CUDA process, bf16)"),
    ("cuda", 1, "fp16", (), "step: eager (auto: fp16)"),
    ("cuda", 2, "no", (), "step: eager (auto: 2 processes)"),
    ("cpu", 1, "no", (), "step: eager (auto: runs on cpu)"),
    ("cuda", 1, "no", ("train.compile=true",), "step: eager (auto: train.compile)"),
    ("cuda", 1, "no", ("data.on_device=false",), "step: eager (auto: data.on_device=false)"),
    ("cuda", 1, "no", ("train.skip_nonfinite=3",), "step: eager (auto: train.skip_nonfinite)"),
    ("cuda", 1, "no", ("train.grad_accum_steps=2",), "step: eager (auto: gradient accumulation)"),
    ("cuda", 1, "no", ("train.cuda_graph=false",), "step: eager (train.cuda_graph=false)"),
    ("cuda", 1, "bf16", ("train.cuda_graph=true",), "step: CUDA graph (train.cuda_graph=true)"),
]


@pytest.mark.parametrize(("device", "processes", "precision", "overrides", "expected"), GRAPH_CASES)
def test_auto_takes_the_cuda_graph_only_where_it_applies(device, processes, precision, overrides, expected):
    cfg = load_config("configs/z2.yaml", list(overrides))
    assert choose_step(cfg, device, processes, precision).describe() == expected


def test_a_forced_cuda_graph_refuses_in_one_line_where_it_cannot_apply():
    cfg = load_config("configs/z2.yaml", ["train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"^train.cuda_graph: does not support fp16 \(its loss scaler decides on "
                                          r"the host\); use bf16; set train.cuda_graph=false or change the launch$"):
        choose_step(cfg, "cuda", 1, "fp16")
