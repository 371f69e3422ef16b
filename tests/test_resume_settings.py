"""What a resumed run takes from the new config and what it refuses to change (no training: real optimizer and
scheduler objects, the functions train() calls right after loading a state)."""

import math

import pytest
import torch

from vae.config import dump_yaml, load_config
from vae.console import RunConsole
from vae.errors import TrainingError
from vae.training.resume import batch_order_settings, check_mid_epoch_resume, check_resumable, follow_config_lr
from vae.training.run_state import EpochSoFar, RunState


def _optimizer_and_scheduler(lr: float, cosine_steps: int | None, steps_taken: int):
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=lr)
    # a constant rate has no scheduler, as in train()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_steps) if cosine_steps else None
    for _ in range(steps_taken):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return optimizer, scheduler


def test_a_changed_lr_takes_effect_on_resume(capsys):
    optimizer, scheduler = _optimizer_and_scheduler(1e-3, None, steps_taken=40)
    cfg = load_config("configs/debug.yaml", ["train.lr=2e-4"])
    follow_config_lr(optimizer, scheduler, cfg, total_steps=40, position=40, console=RunConsole())
    assert optimizer.param_groups[0]["lr"] == 2e-4
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 2e-4
    assert "resumed with train.lr 0.001 -> 0.0002" in capsys.readouterr().out


def test_a_longer_cosine_run_follows_the_new_length():
    optimizer, scheduler = _optimizer_and_scheduler(1e-3, cosine_steps=80, steps_taken=40)
    cfg = load_config("configs/debug.yaml", ["train.lr_schedule=cosine", "train.epochs=4"])
    follow_config_lr(optimizer, scheduler, cfg, total_steps=160, position=40, console=RunConsole(enabled=False))
    expected = 1e-3 * (1 + math.cos(math.pi * 40 / 160)) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    for step in range(41, 161):  # the rest of the schedule is the one a 160-step run would have had
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * step / 160)) / 2,
                                                                 rel=1e-9, abs=1e-15)


def test_a_cosine_run_resumed_with_a_larger_batch_goes_on_from_the_same_fraction():
    """4 epochs of 40 steps, stopped after epoch 2 (step 80), resumed with twice the batch: 20 steps per epoch,
    so the run is half done at step 40 of 80, and the rest anneals from there to 0."""
    optimizer, scheduler = _optimizer_and_scheduler(1e-3, cosine_steps=160, steps_taken=80)
    cfg = load_config("configs/debug.yaml", ["train.lr_schedule=cosine", "train.epochs=4", "train.batch_size=100"])
    follow_config_lr(optimizer, scheduler, cfg, total_steps=80, position=40, console=RunConsole(enabled=False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    rates = []
    for _ in range(40):
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0, abs=1e-15)


def test_an_unchanged_resume_is_left_exactly_as_saved():
    optimizer, scheduler = _optimizer_and_scheduler(1e-3, cosine_steps=80, steps_taken=33)
    before = (optimizer.param_groups[0]["lr"], scheduler.state_dict())
    cfg = load_config("configs/debug.yaml", ["train.lr_schedule=cosine", "train.epochs=2"])
    follow_config_lr(optimizer, scheduler, cfg, total_steps=80, position=33, console=RunConsole(enabled=False))
    assert (optimizer.param_groups[0]["lr"], scheduler.state_dict()) == before


@pytest.mark.parametrize("override", ["train.batch_size=100", "train.seed=1", "data.train_subset=1000",
                                      "train.grad_accum_steps=2"])
def test_mid_epoch_resume_refuses_a_different_batch_order(override):
    saved = load_config("configs/debug.yaml")
    state = RunState(epoch=3, batches_done=17, so_far=EpochSoFar(1.0, 850, batch_order_settings(saved)))
    changed = load_config("configs/debug.yaml", [override])
    key = override.split("=")[0]
    with pytest.raises(TrainingError, match=rf"middle of epoch 3 with {key}=.*resume with {key}="):
        check_mid_epoch_resume(changed, state)
    check_mid_epoch_resume(saved, state)  # the same settings resume
    check_mid_epoch_resume(changed, RunState(epoch=3))  # at an epoch boundary anything goes


def test_a_mid_epoch_state_saved_before_gradient_accumulation_existed_resumes_only_without_it():
    saved = batch_order_settings(load_config("configs/debug.yaml"))
    del saved["train.grad_accum_steps"]  # as states written before the setting existed
    state = RunState(epoch=3, batches_done=17, so_far=EpochSoFar(1.0, 850, saved))
    check_mid_epoch_resume(load_config("configs/debug.yaml"), state)
    with pytest.raises(TrainingError, match="with train.grad_accum_steps=1; resume with train.grad_accum_steps=1"):
        check_mid_epoch_resume(load_config("configs/debug.yaml", ["train.grad_accum_steps=2"]), state)


def test_a_resume_with_changed_settings_names_each_change(tmp_path):
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config("configs/debug.yaml", ["train.lr=1e-3"])))
    said = []
    check_resumable(tmp_path, load_config("configs/debug.yaml", ["train.lr=1e-4", "train.epochs=3",
                                                                  "log.name=other"]), said.append)
    assert said == [f"resuming {tmp_path} with settings changed since its last start: train.epochs=1 -> 3, "
                    f"train.lr=0.001 -> 0.0001"]
    check_resumable(tmp_path, load_config("configs/debug.yaml", ["train.lr=1e-3", "log.name=other"]), said.append)
    assert len(said) == 1  # nothing changed but where it is logged: nothing said
