"""vae.training.optim.FlatAdam, the CUDA graph's Adam, against torch.optim.Adam on the CPU: the same updates, the same
state_dict in both directions, and a model whose parameters live in its flat buffer still saves every tensor."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from accelerate import Accelerator

from vae.config import load_config
from vae.models import VAE, build_model
from vae.models.objectives import negative_elbo_terms
from vae.training.optim import FlatAdam, make_optimizer, restore_step_settings

STEPS = 200
BATCH = 32


def _model() -> VAE:
    """The tutorial's VAE, narrower: 200 steps of it in a second or two, every layer kind the same."""
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.hidden=[64]"]).model, (1, 28, 28))


def _images(mnist_images: torch.Tensor, step: int) -> torch.Tensor:
    start = step * BATCH % (len(mnist_images) - BATCH)
    return mnist_images[start: start + BATCH].float().div(255).reshape(BATCH, -1)


def _train(model: VAE, optimizer, mnist_images: torch.Tensor, steps: range, schedule=None) -> None:
    """Real VAE gradients: the summed -ELBO of MNIST batches, noise seeded per step."""
    for step in steps:
        x = _images(mnist_images, step)
        noise = torch.randn(BATCH, model.z_dim, generator=torch.Generator().manual_seed(step))
        logits, mu, logvar = model(x, noise)
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
        optimizer.zero_grad(set_to_none=True)
        (recon + kl).sum().backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


def _assert_same(flat_model, flat_adam, torch_model, torch_adam, rtol=1e-6) -> None:
    for (name, a), b in zip(flat_model.named_parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(flat_adam.state[a][key], torch_adam.state[b][key], rtol=rtol, atol=1e-9,
                                       msg=lambda m, n=name, k=key: f"{n} {k}: {m}")
        assert float(flat_adam.state[a]["step"]) == float(torch_adam.state[b]["step"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mnist_images(mnist_root):
    from vae.datasets.mnist import load_mnist

    images, _ = load_mnist(mnist_root, train=True)
    return images[:10_000]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_flat_adam_gives_torch_adams_parameters_and_moments_over_200_steps(schedule, mnist_images):
    """Against torch.optim.Adam's own (single-tensor) update, whose arithmetic FlatAdam follows: the gradients
    of the real model at its own parameters, so any difference would grow from step to step."""
    torch_model = _model()
    flat_model = copy.deepcopy(torch_model)
    torch_adam = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    flat_adam = FlatAdam(flat_model.parameters(), lr=torch.tensor(1e-3, dtype=torch.float64))
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=STEPS) if schedule == "cosine" else None
                 for adam in (torch_adam, flat_adam)]
    _train(torch_model, torch_adam, mnist_images, range(STEPS), schedules[0])
    _train(flat_model, flat_adam, mnist_images, range(STEPS), schedules[1])
    _assert_same(flat_model, flat_adam, torch_model, torch_adam)
    assert float(flat_adam.param_groups[0]["lr"]) == pytest.approx(torch_adam.param_groups[0]["lr"], abs=1e-15)


def _feed(model: torch.nn.Module, optimizer, steps: range) -> None:
    """The same gradients whatever the parameters (seeded per step, of a VAE's sizes): what differs between two
    optimizers then is their own arithmetic, not the model's chaos."""
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * (0.01 + step % 5)
        optimizer.step()


def test_flat_adam_stays_within_float_rounding_of_torch_fused_adam():
    """The eager step's fused kernel orders its float operations its own way: within rounding, never apart."""
    fused_model = _model()
    flat_model = copy.deepcopy(fused_model)
    fused = torch.optim.Adam(fused_model.parameters(), lr=1e-3, fused=True)
    flat = FlatAdam(flat_model.parameters(), lr=torch.tensor(1e-3, dtype=torch.float64))
    _feed(fused_model, fused, range(STEPS))
    _feed(flat_model, flat, range(STEPS))
    _assert_same(flat_model, flat, fused_model, fused, rtol=1e-5)


def _through_a_file(state: dict) -> dict:
    """As a checkpoint carries it: saved and read back with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("first", ["flat", "torch"])
def test_a_state_moves_between_flat_adam_and_torch_adam_in_both_directions(first, mnist_images):
    """20 steps with one, its state_dict through a file into the other, 20 more: the 40 steps of either alone."""
    make = {"flat": lambda m: FlatAdam(m.parameters(), lr=torch.tensor(1e-3, dtype=torch.float64)),
            "torch": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)}
    second = "torch" if first == "flat" else "flat"
    reference_model = _model()
    moved_model = copy.deepcopy(reference_model)
    reference = make[second](reference_model)
    _train(reference_model, reference, mnist_images, range(40))

    before = make[first](moved_model)
    _train(moved_model, before, mnist_images, range(20))
    saved = _through_a_file(before.state_dict())
    steps = [state["step"] for state in saved["state"].values()]
    assert len({id(s) for s in steps}) == len(steps), "each parameter's step must be its own tensor"
    after = make[second](moved_model)
    after.load_state_dict(saved)
    if second == "flat":
        restore_step_settings(after, torch.device("cpu"))
    else:  # the unfused torch Adam of this test (the harness's eager Adam is fused: the test below)
        after.param_groups[0].update(capturable=False, lr=float(after.param_groups[0]["lr"]))
    _train(moved_model, after, mnist_images, range(20, 40))
    _assert_same(moved_model, after, reference_model, reference)


def test_a_fused_adam_state_resumes_under_flat_adam():
    """What an eager GPU run saves (fused Adam) and its resume under the CUDA graph loads, and the way back."""
    reference_model = _model()
    moved_model = copy.deepcopy(reference_model)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-3, fused=True)
    _feed(reference_model, reference, range(40))
    fused = torch.optim.Adam(moved_model.parameters(), lr=1e-3, fused=True)
    _feed(moved_model, fused, range(20))
    flat = FlatAdam(moved_model.parameters(), lr=torch.tensor(1e-3, dtype=torch.float64))
    flat.load_state_dict(_through_a_file(fused.state_dict()))
    _feed(moved_model, flat, range(20, 30))
    fused_again = torch.optim.Adam(moved_model.parameters(), lr=1e-3, fused=True)
    fused_again.load_state_dict(_through_a_file(flat.state_dict()))
    restore_step_settings(fused_again, torch.device("cpu"))
    _feed(moved_model, fused_again, range(30, 40))
    _assert_same(moved_model, fused_again, reference_model, reference, rtol=1e-5)


def test_restored_settings_follow_the_optimizer_that_loads_them(mnist_images):
    model = _model()
    flat = FlatAdam(model.parameters(), lr=torch.tensor(2e-3, dtype=torch.float64))
    _train(model, flat, mnist_images, range(2))
    eager = torch.optim.Adam(_model().parameters(), lr=1e-3, fused=True)
    eager.load_state_dict(flat.state_dict())
    restore_step_settings(eager, torch.device("cpu"))
    group = eager.param_groups[0]
    assert (group["capturable"], group["fused"], type(group["lr"])) == (False, True, float)
    assert group["lr"] == pytest.approx(2e-3)
    flat.load_state_dict(eager.state_dict())
    restore_step_settings(flat, torch.device("cpu"))
    assert flat.param_groups[0]["capturable"] and isinstance(flat.param_groups[0]["lr"], torch.Tensor)


def test_flat_parameters_are_views_into_one_buffer_and_keep_being_updated_after_a_move(mnist_images):
    torch_model = _model()
    flat_model = copy.deepcopy(torch_model)
    torch_adam = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    flat_adam = FlatAdam(flat_model.parameters(), lr=torch.tensor(1e-3, dtype=torch.float64))
    storages = {p.untyped_storage().data_ptr() for p in flat_model.parameters()}
    assert len(storages) == 1
    _train(torch_model, torch_adam, mnist_images, range(3))
    _train(flat_model, flat_adam, mnist_images, range(3))
    first = next(flat_model.parameters())
    first.data = first.data.clone()  # new storage, as a .to() to another device or dtype would give
    _train(torch_model, torch_adam, mnist_images, range(3, 6))
    _train(flat_model, flat_adam, mnist_images, range(3, 6))
    _assert_same(flat_model, flat_adam, torch_model, torch_adam)


def test_a_model_under_flat_adam_saves_and_loads_every_tensor_through_accelerate(tmp_path, mnist_images):
    """Accelerate saves models as safetensors, which keeps one of several tensors sharing memory: without
    vae.training.optim's state_dict hook only the first parameter of the flat buffer would reach the file."""
    accelerator = Accelerator(cpu=True)
    raw = _model()
    adam = make_optimizer(raw, 1e-3, torch.device("cpu"), cuda_graph=True)
    assert isinstance(adam, FlatAdam)
    model, optimizer = accelerator.prepare(raw, adam)
    _train(raw, optimizer, mnist_images, range(3))
    accelerator.save_state(str(tmp_path / "state"))
    trained = {k: v.clone() for k, v in raw.state_dict().items()}
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in trained.values())

    fresh_accelerator = Accelerator(cpu=True)
    fresh = _model()
    fresh_adam = make_optimizer(fresh, 1e-3, torch.device("cpu"), cuda_graph=True)
    fresh_accelerator.prepare(fresh, fresh_adam)
    fresh_accelerator.load_state(str(tmp_path / "state"))
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    assert float(fresh_adam.state[next(fresh.parameters())]["step"]) == 3
