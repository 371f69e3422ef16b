"""train.ema_decay's average of the weights, in process: its arithmetic, its state, and the resume rule."""

import contextlib
import pathlib

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from vae.config import ConfigError, dump_yaml, load_config
from vae.errors import TrainingError
from vae.training.ema import EMA_FILE, WeightAverage, weight_average
from vae.training.resume import check_resumable


def test_the_average_follows_the_warmed_up_decay_and_leaves_the_trained_weights_alone():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for t in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        trained = [p.detach().clone() for p in model.parameters()]
        average.update()
        decay = min(0.9, t / (9 + t))  # (1 + n) / (10 + n) with n = t - 1 earlier updates
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, trained, strict=True)]
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), trained, strict=True))
    for got, want in zip(average.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in average.module.parameters())


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def _averaged(accelerator, updates: int):
    model = torch.nn.Linear(3, 2)
    average = weight_average(model, 0.99, accelerator)
    for _ in range(updates):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update()
    return accelerator.prepare(model), average


def test_the_average_is_saved_and_resumed_as_tensors_with_accelerates_state(tmp_path, accelerator):
    model, average = _averaged(accelerator, updates=5)
    accelerator.save_state(str(tmp_path))
    assert (tmp_path / EMA_FILE).is_file() and not list(tmp_path.glob("custom_checkpoint_*"))
    saved = [p.clone() for p in average.module.parameters()]
    with torch.no_grad():
        for p in average.module.parameters():
            p.zero_()
    average.updates = 0
    accelerator.load_state(str(tmp_path))
    assert average.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(average.module.parameters(), saved, strict=True))


class Planted:
    """A pickle that runs code when loaded: here it only creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_state_saved_with_the_earlier_pickled_average_resumes_and_is_converted(tmp_path, accelerator):
    model, average = _averaged(accelerator, updates=3)
    accelerator.save_state(str(tmp_path))
    saved = [p.clone() for p in average.module.parameters()]
    (tmp_path / EMA_FILE).unlink()  # as an earlier version saved it: the average as Accelerate's pickle
    torch.save({"weights": average.module.state_dict(), "updates": 3}, tmp_path / "custom_checkpoint_0.pkl")
    average.updates = 0
    accelerator.load_state(str(tmp_path))
    assert average.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(average.module.parameters(), saved, strict=True))
    assert (tmp_path / EMA_FILE).is_file() and not (tmp_path / "custom_checkpoint_0.pkl").exists()


def test_a_pickle_planted_in_a_state_is_never_unpickled_on_resume(tmp_path, accelerator):
    _averaged(accelerator, updates=2)
    accelerator.save_state(str(tmp_path))
    marker = tmp_path / "the-pickle-ran"
    torch.save(Planted(marker), tmp_path / "custom_checkpoint_0.pkl")  # where Accelerate keeps extra objects
    with contextlib.suppress(Exception):  # refused, or loaded without it: either way its code never runs
        accelerator.load_state(str(tmp_path))
    (tmp_path / EMA_FILE).unlink()  # and taken for an earlier version's average: read with weights_only=True
    with contextlib.suppress(Exception):
        accelerator.load_state(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("before, after, message", [
    ("null", 0.999, r"without an average of the weights \(train.ema_decay=null\) and cannot start one on resume"),
    (0.999, "null", r"keeps an average of the weights \(train.ema_decay=0.999\) and cannot drop it on resume"),
])
def test_a_run_cannot_start_or_stop_keeping_an_average_on_resume(before, after, message, tmp_path):
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config("configs/debug.yaml", [f"train.ema_decay={before}"])))
    with pytest.raises(TrainingError, match=message):
        check_resumable(tmp_path, load_config("configs/debug.yaml", [f"train.ema_decay={after}"]))
    check_resumable(tmp_path, load_config("configs/debug.yaml", [f"train.ema_decay={before}"]))


def test_a_run_keeping_an_average_may_resume_with_another_decay(tmp_path):
    (tmp_path / "config.yaml").write_text(dump_yaml(load_config("configs/debug.yaml", ["train.ema_decay=0.99"])))
    check_resumable(tmp_path, load_config("configs/debug.yaml", ["train.ema_decay=0.999"]))


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_a_decay_outside_0_to_1_is_refused_in_one_line(decay):
    with pytest.raises(ConfigError, match="train.ema_decay: must be between 0 and 1"):
        load_config("configs/debug.yaml", [f"train.ema_decay={decay}"])

