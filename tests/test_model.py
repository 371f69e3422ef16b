import math
import warnings

import pytest
import torch

from vae.config import ModelConfig
from vae.models import MLPVAE, build_model
from vae.models.objectives import kl_to_standard_normal, negative_elbo_terms, reconstruction_nats


def test_architecture_is_the_tutorials_mlp():
    model = MLPVAE(z_dim=2, hidden=(400,))
    shapes = [tuple(p.shape) for p in model.parameters()]
    # encoder 784-400, one head for (mu, logvar) 400-2x2, decoder 2-400-784
    assert shapes == [(400, 784), (400,), (4, 400), (4,), (400, 2), (400,), (784, 400), (784,)]
    logits, mu, logvar = model(torch.rand(5, 784))
    assert logits.shape == (5, 784) and mu.shape == logvar.shape == (5, 2)


def test_loss_matches_a_hand_computed_value():
    # One image of 2 "pixels" is enough to check the formula: recon = sum_i -[x log s(l) + (1-x) log(1-s(l))]
    logits = torch.tensor([[0.0, 2.0]])
    x = torch.tensor([[1.0, 0.25]])
    s = 1 / (1 + math.exp(-2.0))
    expected_recon = -math.log(0.5) - (0.25 * math.log(s) + 0.75 * math.log(1 - s))
    assert abs(reconstruction_nats(logits, x).item() - expected_recon) < 1e-5
    # KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (sigma^2 + mu^2 - 1 - log sigma^2), summed over dimensions
    mu = torch.tensor([[1.0, -0.5]])
    logvar = torch.tensor([[math.log(4.0), 0.0]])
    expected_kl = 0.5 * (4 + 1 - 1 - math.log(4)) + 0.5 * (1 + 0.25 - 1 - 0)
    assert abs(kl_to_standard_normal(mu, logvar).item() - expected_kl) < 1e-6


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    z = torch.zeros(3, 4)
    assert torch.allclose(kl_to_standard_normal(z, z), torch.zeros(3))
    assert (kl_to_standard_normal(torch.randn(3, 4), torch.randn(3, 4)) > 0).all()


def test_loss_is_float32_and_finite_under_bf16_autocast():
    torch.manual_seed(0)
    model = MLPVAE(z_dim=2)
    x = torch.rand(8, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, mu, logvar = model(x)
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
    assert logits.dtype == torch.bfloat16
    assert recon.dtype == kl.dtype == torch.float32
    assert torch.isfinite(recon).all() and torch.isfinite(kl).all()
    # an untrained decoder outputs ~0.5 everywhere: about 784 * log 2 nats for a mid-grey target
    assert 400 < recon.mean().item() < 700


@pytest.mark.parametrize("batch, z_dim", [(50, 2), (50, 20), (1024, 2)])
def test_fp16_starts_at_a_loss_scale_whose_gradients_fit_fp16(batch, z_dim, mnist_root):
    """The summed loss's gradients times the first loss scale stay below fp16's maximum at initialisation (where
    they are largest), so fp16 does not skip its first steps; GradScaler's default 65536 would overflow."""
    from vae.cluster.launch import FP16_MAX, fp16_initial_scale
    from vae.datasets.batches import to_unit_float
    from vae.datasets.mnist import load_mnist

    torch.manual_seed(0)
    model = build_model(ModelConfig(z_dim=z_dim), (1, 28, 28))
    x = to_unit_float(load_mnist(mnist_root, train=True)[0][:batch])
    peaks = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_full_backward_hook(lambda _, __, out: peaks.append(out[0].abs().max().item()))
    logits, mu, logvar = model(x, torch.randn(batch, z_dim))
    recon, kl = negative_elbo_terms(logits, x, mu, logvar)
    with warnings.catch_warnings():  # the first layer's input needs no gradient: its hook says so
        warnings.simplefilter("ignore")
        (recon + kl).sum().backward()
    largest = max(max(peaks), *(p.grad.abs().max().item() for p in model.parameters()))
    assert largest * fp16_initial_scale(batch) < FP16_MAX
    assert largest * 65536 > FP16_MAX


def test_the_test_set_nelbo_does_not_depend_on_the_number_of_importance_samples():
    from vae.evaluation.metrics import score_batch

    torch.manual_seed(0)
    model = MLPVAE(z_dim=2).eval()
    x = torch.rand(20, 784)
    nelbo = {k: score_batch(model, x, torch.arange(20), iwae_k=k, seed=0)["nelbo"] for k in (1, 6, 100)}
    assert torch.equal(nelbo[1], nelbo[6]) and torch.equal(nelbo[1], nelbo[100])
