"""The loss section (vae.models.objectives) against hand computations on a small batch, and its keys through a real
training that stops and resumes."""

from __future__ import annotations

import math

import pytest
import torch

from vae.config import LossConfig, load_config
from vae.models.objectives import Objective, negative_elbo_terms

from .conftest import assert_ok, python, read_jsonl, train_cmd
from .test_tensorboard import read_events

# Two images, three pixels, two latent dimensions: small enough to compute by hand.
X = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
LOGITS = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.5, 1.0]])
MU = torch.tensor([[0.5, -1.0], [0.0, 0.1]])
LOGVAR = torch.tensor([[0.0, math.log(0.25)], [math.log(4.0), 0.0]])


def _bernoulli_nats(logit: float, x: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(x * math.log(p) + (1 - x) * math.log(1 - p))


def _kl_dimension(mu: float, logvar: float) -> float:
    return 0.5 * (math.exp(logvar) + mu * mu - 1 - logvar)


def _by_hand(image: int) -> tuple[float, list[float]]:
    pixels = zip(LOGITS[image].tolist(), X[image].tolist(), strict=True)
    recon = sum(_bernoulli_nats(logit, x) for logit, x in pixels)
    return recon, [_kl_dimension(m, lv) for m, lv in zip(MU[image].tolist(), LOGVAR[image].tolist(), strict=True)]


def _losses(**loss) -> torch.Tensor:
    objective = Objective(LossConfig(**loss), torch.device("cpu"))
    return objective.losses(X, LOGITS, MU, LOGVAR, torch.zeros(2, 2))


def test_the_default_objective_is_the_tutorials_negative_elbo_to_the_last_digit():
    loss, recon, kl = _losses()
    tutorial_recon, tutorial_kl = negative_elbo_terms(LOGITS, X, MU, LOGVAR)
    assert torch.equal(loss, tutorial_recon + tutorial_kl)
    assert torch.equal(recon, tutorial_recon) and torch.equal(kl, tutorial_kl)
    for image in range(2):
        by_hand, dimensions = _by_hand(image)
        assert loss[image].item() == pytest.approx(by_hand + sum(dimensions), rel=1e-6)


def test_beta_weighs_the_kl_term_and_the_reported_terms_stay_the_elbos():
    loss, recon, kl = _losses(beta=4.0)
    for image in range(2):
        by_hand, dimensions = _by_hand(image)
        assert loss[image].item() == pytest.approx(by_hand + 4.0 * sum(dimensions), rel=1e-6)
        assert recon[image].item() + kl[image].item() == pytest.approx(by_hand + sum(dimensions), rel=1e-6)


def test_free_bits_count_each_images_dimension_as_at_least_the_floor():
    loss, _, _ = _losses(free_bits=0.2)
    for image in range(2):
        by_hand, dimensions = _by_hand(image)
        assert loss[image].item() == pytest.approx(by_hand + sum(max(0.2, d) for d in dimensions), rel=1e-6)
    assert min(min(_by_hand(i)[1]) for i in range(2)) < 0.2  # the floor binds for some dimension here


def test_kl_warmup_raises_the_weight_linearly_to_beta_and_the_step_reads_it_from_the_device():
    objective = Objective(LossConfig(beta=2.0, kl_warmup_steps=4), torch.device("cpu"))
    assert [objective.weight_at(step) for step in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    objective.at_step(1)
    loss, _, _ = objective.losses(X, LOGITS, MU, LOGVAR, torch.zeros(2, 2))
    by_hand, dimensions = _by_hand(0)
    assert loss[0].item() == pytest.approx(by_hand + 1.0 * sum(dimensions), rel=1e-6)
    assert objective.logged(2) == {"train/beta": 1.0}  # the weight of the step just taken (the second)
    assert Objective(LossConfig(), torch.device("cpu")).logged(2) == {}  # the plain ELBO logs no weight


def test_each_training_step_weighs_the_kl_as_the_warmup_says_at_its_step():
    from accelerate import Accelerator

    from vae.models import build_model
    from vae.training.step import prepare_optimization, train_step_for

    cfg = load_config("configs/debug.yaml", ["loss.beta=2", "loss.kl_warmup_steps=4", "train.batch_size=4"])
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = prepare_optimization(build_model(cfg.model, (1, 28, 28)), cfg.train, accelerator,
                                               steps_per_epoch=8, cuda_graph=False)
    images = torch.randint(0, 256, (8, 784), dtype=torch.uint8)
    step = train_step_for(cfg, False, model, optimizer, accelerator, images)
    for at in (0, 2, 7):
        assert step(torch.arange(4), 4, (0, 4), at)
        assert step.objective.kl_weight.item() == step.objective.weight_at(at) == 2 * min(1, (at + 1) / 4)


def test_the_iwae_bound_by_hand_with_two_samples():
    """k = 2: -log((w_1 + w_2) / 2), w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i = mu + sigma * noise_i."""
    noise = torch.tensor([[[0.3, -0.2], [-1.0, 0.5]], [[0.0, 0.0], [1.5, -0.5]]])
    logits = torch.stack([LOGITS, LOGITS.flip(0)], dim=1)  # [2 images, 2 samples, 3 pixels]
    loss, recon, kl = Objective(LossConfig(iwae_k=2), torch.device("cpu")).losses(X, logits, MU, LOGVAR, noise)
    for image in range(2):
        log_w = []
        for sample in range(2):
            pixels = zip(logits[image, sample].tolist(), X[image].tolist(), strict=True)
            log_px = -sum(_bernoulli_nats(lg, x) for lg, x in pixels)
            log_pz = log_qz = 0.0
            latents = zip(MU[image].tolist(), LOGVAR[image].tolist(), noise[image, sample].tolist(), strict=True)
            for m, lv, e in latents:
                z = m + math.exp(0.5 * lv) * e
                log_pz += -0.5 * (math.log(2 * math.pi) + z * z)
                log_qz += -0.5 * (math.log(2 * math.pi) + lv + e * e)
            log_w.append(log_px + log_pz - log_qz)
        top = max(log_w)
        expected = -(top + math.log(sum(math.exp(w - top) for w in log_w) / 2))
        assert loss[image].item() == pytest.approx(expected, rel=1e-6)
    assert kl.tolist() == pytest.approx([sum(_by_hand(i)[1]) for i in range(2)], rel=1e-6)
    assert recon.shape == (2,)


def test_iwae_k_1_is_the_elbo_and_its_one_sample_bound_estimates_it():
    """loss.iwae_k=1 trains the ELBO itself; the bound's formula with one sample is the single-sample ELBO with the
    KL sampled instead of in closed form, so over many samples it averages to the closed-form -ELBO."""
    objective = Objective(LossConfig(iwae_k=1), torch.device("cpu"))
    assert objective.samples == 1 and torch.equal(_losses(iwae_k=1)[0], _losses()[0])
    samples = 20_000  # each a bound with k = 1: the images repeated, one sample each
    noise = torch.randn(2 * samples, 1, 2, generator=torch.Generator().manual_seed(0))
    repeat = lambda t: t.repeat_interleave(samples, dim=0)  # noqa: E731
    bound = objective._iwae(repeat(X), repeat(LOGITS)[:, None], repeat(MU), repeat(LOGVAR), noise)[0]
    assert bound.reshape(2, samples).mean(1).tolist() == pytest.approx(_losses()[0].tolist(), abs=0.05)


def test_unknown_combinations_are_refused_naming_the_key():
    with pytest.raises(Exception, match="^loss.iwae_k: must be 1 when loss.beta"):
        load_config(None, ["loss.iwae_k=4", "loss.beta=2"])
    with pytest.raises(Exception, match=r"^loss.free_bits: must be >= 0"):
        load_config(None, ["loss.free_bits=-1"])


# ---------------------------------------------------------------------------------------------------------
# Through a real training: train/beta logged, and a resume mid-warm-up trains the uninterrupted model

WARMUP = ("loss.beta=2", "loss.kl_warmup_steps=60", "loss.free_bits=0.05", "data.train_subset=2000",
          "log.every_steps=10", "log.trackers=[tensorboard]", "train.epochs=2")


@pytest.mark.slow
def test_warmup_and_beta_are_logged_and_a_resume_trains_the_uninterrupted_model(tmp_path, mnist_root):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_ok(python(*train_cmd(straight, mnist_root, *WARMUP)))
    assert_ok(python(*train_cmd(resumed, mnist_root, *WARMUP[:-1], "train.epochs=1")))
    assert_ok(python(*train_cmd(resumed, mnist_root, *WARMUP)))  # epoch 2 resumes at step 40, inside the warm-up
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [read_jsonl(run / "metrics.jsonl")[-1] for run in (straight, resumed)]
    assert rows[0]["val/loss"] == rows[1]["val/loss"]
    events = read_events(straight / "tensorboard")
    beta = {event.step: event.value for event in events.Scalars("train/beta")}
    assert beta[10] == pytest.approx(2 * 10 / 60) and beta[40] == pytest.approx(2 * 40 / 60)
    assert beta[70] == pytest.approx(2.0)  # warm-up over after 60 updates
