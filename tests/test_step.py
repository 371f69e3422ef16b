"""The optimizer and schedule as train() builds them, stepped in-process on the CPU (no training run)."""

import math
import warnings

import pytest
import torch
from accelerate import Accelerator

from vae.cluster.launch import choose_step
from vae.config import ConfigError, load_config
from vae.console import RunConsole
from vae.models import build_model
from vae.training.resume import follow_config_lr
from vae.training.step import IwaeStages, make_train_step, prepare_optimization

STEPS = 4


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_schedule_sees_every_adam_step_so_torch_never_warns_of_the_wrong_order(schedule):
    cfg = load_config("configs/debug.yaml", [f"train.lr_schedule={schedule}", "train.batch_size=4"])
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = prepare_optimization(build_model(cfg.model, (1, 28, 28)), cfg.train, accelerator,
                                                       steps_per_epoch=STEPS, cuda_graph=False)
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


def test_the_iwae_schedule_has_the_papers_stages_of_3_to_the_i_epochs():
    """Burda et al. (2015): 3^i epochs at 1e-3 x 10^(-i/7), i = 0..7 (3,280 epochs)."""
    ends = [sum(3**j for j in range(i + 1)) for i in range(8)]
    assert ends == [1, 4, 13, 40, 121, 364, 1093, 3280]
    for stage, end in enumerate(ends):
        first = ends[stage - 1] + 1 if stage else 1
        assert IwaeStages.stage_of_epoch(first) == IwaeStages.stage_of_epoch(end) == stage
    assert IwaeStages.stage_of_epoch(5000) == 7
    stages = IwaeStages(steps_per_epoch=10)
    steps = (0, 9, 10, 39, 40, 130, 400)  # epochs 1, 1, 2, 4, 5, 14, 41
    assert [stages(step) for step in steps] == pytest.approx([10 ** (-i / 7) for i in (0, 0, 1, 1, 2, 3, 4)])


def _optimization(*overrides, steps_per_epoch=10, cuda_graph=False):
    cfg = load_config("configs/debug.yaml", ["train.batch_size=4", *overrides])
    parts = prepare_optimization(build_model(cfg.model, (1, 28, 28)), cfg.train, Accelerator(cpu=True),
                                 steps_per_epoch=steps_per_epoch, cuda_graph=cuda_graph)
    return cfg, *parts


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["torch_adam", "flat_adam"])
def test_adams_betas_and_epsilon_come_from_the_config(cuda_graph):
    _, _, optimizer, _ = _optimization("train.adam_betas=[0.9, 0.99]", "train.adam_eps=1e-4", cuda_graph=cuda_graph)
    group = optimizer.param_groups[0]
    assert (tuple(group["betas"]), group["eps"]) == ((0.9, 0.99), 1e-4)


def test_the_iwae_schedule_steps_with_the_optimizer_and_a_resume_follows_the_epoch_not_the_step():
    cfg, _, optimizer, scheduler = _optimization("train.lr_schedule=iwae")
    for _ in range(10):  # epoch 1 (stage 0); the schedule steps once per batch
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 10 ** (-1 / 7))  # epoch 2 starts stage 1
    # Resumed at epoch 5, batch 0, with 20 steps per epoch now (a new batch size): stage 2, from the epoch
    cfg, _, optimizer, scheduler = _optimization("train.lr_schedule=iwae", steps_per_epoch=20)
    follow_config_lr(optimizer, scheduler, cfg, cfg.train.epochs * 20, 4 * 20, RunConsole(False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 10 ** (-2 / 7))


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
