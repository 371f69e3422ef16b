"""The likelihood protocol of evaluate.py, in-process: the continuous Bernoulli's normaliser, bits/dim under
uniform dequantization, the IWAE batches' bounded memory, and the protocol metrics.json states."""

import pytest
import torch
import torch.nn.functional as F

from vae.config import ModelConfig, config_to_dict, load_config
from vae.errors import HarnessError
from vae.evaluation.metrics import NOISE_NUMBERS, continuous_bernoulli_log_norm, images_per_batch, score_batch
from vae.evaluation.scoring import _score_test_set, evaluate, likelihood_protocol
from vae.models import build_model
from vae.storage.checkpoint import save_model_file

MNIST = (1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def test_images(mnist_root):
    from vae.datasets.mnist import load_mnist

    return load_mnist(mnist_root, train=False)[0][:300]  # uint8 [300, 784]


def test_the_continuous_bernoulli_normaliser_makes_its_density_integrate_to_one():
    logits = torch.tensor([-30.0, -5.0, -1.0, -1e-4, 0.0, 1e-4, 1e-2, 1.0, 5.0, 30.0])
    u = torch.linspace(0, 1, 400_001, dtype=torch.float64)[:, None]
    log_p, log_1_minus_p = F.logsigmoid(logits.double()), F.logsigmoid(-logits.double())
    log_density = u * log_p + (1 - u) * log_1_minus_p + continuous_bernoulli_log_norm(logits).double()
    integral = torch.trapezoid(log_density.exp(), u[:, 0], dim=0)
    assert torch.allclose(integral, torch.ones_like(integral), atol=1e-6), integral


def _constant_model(z_dim: int, pixel_logits: torch.Tensor | None = None):
    """An MLP VAE whose encoder returns the prior (mu 0, log sigma^2 0) and whose decoder returns these logits
    (0: the continuous Bernoulli at p = 1/2 is the uniform density on [0, 1]) whatever the input."""
    model = build_model(ModelConfig(z_dim=z_dim, hidden=(16,)), MNIST)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        if pixel_logits is not None:
            model.decoder.out.bias.copy_(pixel_logits)
    return model.eval()


def test_a_uniform_density_scores_8_bits_per_dim_and_a_fitted_one_fewer(test_images):
    x, indices = test_images[:20].float() / 255, torch.arange(20)
    uniform = score_batch(_constant_model(3), x, indices, iwae_k=7, seed=0, dequantize=True)
    # q(z|x) is the prior, so every importance weight is p(u|z) = 1 exactly: -log p(u) = 0, 8 bits per pixel
    assert torch.allclose(uniform["bits_per_dim"], torch.full((20,), 8.0), atol=1e-5), uniform["bits_per_dim"]
    mean = (test_images.float() / 255).mean(0).clamp(0.01, 0.99)
    fitted = score_batch(_constant_model(3, (mean / (1 - mean)).log()), x, indices, iwae_k=7, seed=0,
                         dequantize=True)
    assert 1.0 < fitted["bits_per_dim"].mean() < 7.0, fitted["bits_per_dim"].mean()
    assert "bits_per_dim" not in score_batch(_constant_model(3), x, indices, iwae_k=7, seed=0)


def test_iwae_batches_stay_within_the_noise_budget_and_give_the_same_numbers(test_images):
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = build_model(ModelConfig(z_dim=50, hidden=(32,)), MNIST).eval()
    encoded = []
    encode = model.encode
    model.encode = lambda x: encoded.append(len(x)) or encode(x)
    accelerator = Accelerator(cpu=True)
    k, images = 2000, test_images[:200]
    bounded = _score_test_set(model, images, accelerator, 500, k, 0, dequantize=False)
    assert images_per_batch(k, 50) == 167 and max(encoded) == 167 and sum(encoded) == 200, encoded
    assert (1 + k) * 50 * max(encoded) <= NOISE_NUMBERS
    encoded.clear()
    small = _score_test_set(model, images, accelerator, 20, k, 0, dequantize=False)
    assert max(encoded) == 20
    for key in ("nelbo", "iwae_nll"):
        torch.testing.assert_close(bounded[key], small[key], rtol=1e-5, atol=1e-4)


def _model_file(path, mnist_root, *overrides):
    cfg = load_config(None, [f"data.root={mnist_root}", "model.hidden=[32]", "model.z_dim=4", *overrides])
    torch.manual_seed(0)
    save_model_file(path, build_model(cfg.model, MNIST), config_to_dict(cfg), epoch=1, metrics={})
    return path


@pytest.mark.parametrize("binarize", ["dynamic", "none"])
def test_metrics_json_states_the_protocol_that_produced_the_number(binarize, mnist_root, tmp_path):
    ckpt = _model_file(tmp_path / "last.pt", mnist_root, f"data.binarize={binarize}")
    results = evaluate(ckpt, iwae_k=30, out=tmp_path / "m.json", batch_size=100, cpu=True, figures=False,
                       fcd_samples=0, test_images=150)
    protocol = results["protocol"]
    assert results["n_images"] == protocol["test_images"] == 150 and protocol["k"] == 30
    assert protocol["whole_test_set"] is False and "150 of 10000 images" in protocol["data"]
    if binarize == "dynamic":
        assert protocol["nll_nats"] == results["iwae_nll"] and protocol["paper_protocol"] is False
        assert "binarized once" in protocol["data"] and "bits_per_dim" not in results
    else:
        # an untrained model's logits are near 0: near the uniform density's 8 bits per pixel
        assert protocol["bits_per_dim"] == results["bits_per_dim"] and 7.5 < results["bits_per_dim"] < 8.5
        assert "8-bit" in protocol["data"] and "uniform" in protocol["dequantization"]
        assert "nll_nats" not in protocol
    assert (results["config"]["binarize"], results["config"]["activation"]) == (binarize, "relu")


def test_only_k_5000_on_the_whole_binarized_test_set_is_marked_as_the_papers_protocol(mnist_root, tmp_path):
    from vae.config import DataConfig

    binarized, grey = DataConfig(binarize="dynamic"), DataConfig()
    metrics = {"n_images": 10_000, "iwae_nll": 88.5, "bits_per_dim": 1.5}
    assert likelihood_protocol(binarized, 10_000, metrics, 5000, 0)["paper_protocol"] is True
    assert likelihood_protocol(binarized, 10_000, metrics, 4999, 0)["paper_protocol"] is False
    assert likelihood_protocol(binarized, 10_001, metrics, 5000, 0)["paper_protocol"] is False
    assert "paper_protocol" not in likelihood_protocol(grey, 10_000, metrics, 5000, 0)
    ckpt = _model_file(tmp_path / "last.pt", mnist_root)
    with pytest.raises(HarnessError, match=r"--test-images: must be >= 1 \(got 0\)"):
        evaluate(ckpt, test_images=0, cpu=True, figures=False, fcd_samples=0)
