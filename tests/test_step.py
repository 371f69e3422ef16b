"""The optimizer and schedule as train() builds them, stepped in-process on the CPU (no training run)."""

import math
import warnings

import pytest
import torch
from accelerate import Accelerator

from vae.config import load_config
from vae.model import VAE
from vae.step import make_train_step, prepare_optimization

STEPS = 4


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_schedule_sees_every_adam_step_so_torch_never_warns_of_the_wrong_order(schedule):
    cfg = load_config("configs/debug.yaml", [f"train.lr_schedule={schedule}", "train.batch_size=4"])
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = prepare_optimization(VAE.from_config(cfg.model), cfg.train, accelerator,
                                                       total_steps=STEPS)
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
