"""Test-set metrics of a trained VAE that do not depend on how the images are split across processes.

Every random draw for image i comes from a generator seeded with (seed, i): the same image gets the same noise
whether it is scored by process 0 of 1 or process 3 of 4, so 1-process and N-process numbers are equal.

Per image, in nats:
- recon, kl, nelbo: single-sample estimate of -ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)) (KL in closed form)
- iwae_nll: -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al., 2015), an upper bound on
  -log p(x) that tightens as k grows; at k = 1 it is the single-sample -ELBO (with the sampled KL). On binarized
  images it is the test NLL of the VAE papers. On grey levels the Bernoulli "likelihood" is no density (its
  integral over [0, 1] is not 1), so it is a loss, not a likelihood; for those:
- bits_per_dim (dequantize=True, 8-bit images v in {0..255}): the model as a density of u in [0, 1]^D, the
  decoder's logits as a continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019: the Bernoulli's formula times its
  normalising constant), scored at u = (v + U) / 256 with U ~ Uniform[0, 1) per pixel (uniform dequantization,
  Theis et al., 2016) by the same IWAE bound and the same z_i. Then -log P(v) <= -log p(u) + D log 256 in
  expectation, and bits/dim = (IWAE NLL(u) + D log 256) / (D log 2) is an upper bound on the model's
  discrete NLL in bits per pixel.
"""

from __future__ import annotations

import math

import torch

from ..models import VAE
from ..models.objectives import kl_to_standard_normal, log_normal, reconstruction_nats

# The k importance samples of a batch's images are decoded at most this many at a time, a chunk of samples per
# image: the memory is this many times what the decoder holds per sample (about 5 KB for the tutorial's mlp,
# 100 KB for configs/z20_conv.yaml's conv), whatever the batch size and k.
IWAE_DECODES = 8192
# The noise of a batch's k importance samples is drawn at once ([B, 1 + k, z]: the draws of an image must not
# depend on how its samples are chunked): batches hold at most this many numbers of it, 64 MB.
NOISE_NUMBERS = 1 << 24


def per_image_uniforms(indices: torch.Tensor, pixels: int, seed: int, device: torch.device) -> torch.Tensor:
    """[B, pixels] Uniform[0, 1): the dequantization noise of each image, a function of (seed, image) alone, from
    seeds that the latent noise (per_image_noise) never uses."""
    generator = torch.Generator()
    rows = []
    for index in indices.tolist():
        generator.manual_seed(seed * 1_000_003 + int(index) + (1 << 40))
        rows.append(torch.rand(pixels, generator=generator))
    return torch.stack(rows).to(device)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C of the continuous Bernoulli with these logits, elementwise: C = 2 artanh(1 - 2p) / (1 - 2p) at
    p = sigmoid(logit), which is logit / tanh(logit / 2), 2 at logit 0 (there: log 2 + logit^2 / 12)."""
    eta = logits.float()
    near_zero = eta.abs() < 1e-3
    safe = torch.where(near_zero, torch.ones_like(eta), eta)
    return torch.where(near_zero, math.log(2.0) + eta.pow(2) / 12, (safe / torch.tanh(safe / 2)).log())


def images_per_batch(iwae_k: int, z_dim: int) -> int:
    """The most images a batch may hold so that its noise stays within NOISE_NUMBERS (at least one)."""
    return max(1, NOISE_NUMBERS // ((1 + iwae_k) * z_dim))


def per_image_noise(indices: torch.Tensor, count: int, z_dim: int, seed: int,
                    device: torch.device) -> torch.Tensor:
    """[B, count, z] standard normal noise; row b depends only on (seed, indices[b]), never on the batch, the
    number of processes or the device: it is drawn on the CPU (CUDA's generator gives other numbers) and moved."""
    generator = torch.Generator()
    rows = []
    for index in indices.tolist():
        generator.manual_seed(seed * 1_000_003 + int(index))
        rows.append(torch.randn(count, z_dim, generator=generator))
    return torch.stack(rows).to(device)


@torch.no_grad()
def score_batch(model: VAE, x: torch.Tensor, indices: torch.Tensor, *, iwae_k: int, seed: int,
                dequantize: bool = False) -> dict:
    """Per-image metrics for one batch: x [B, D] in [0, 1], indices [B] global image indices. dequantize: x holds
    8-bit grey levels (v / 255): also their bits per dimension (module docstring)."""
    mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    z_dim = mu.shape[1]
    # The -ELBO sample is drawn on its own: as row 0 of the k importance samples' draw it changed with k (torch
    # draws fewer than 16 numbers with another algorithm than more), so nelbo moved with --iwae-k.
    elbo_eps = per_image_noise(indices, 1, z_dim, seed, x.device)[:, 0]
    eps = per_image_noise(indices, 1 + iwae_k, z_dim, seed, x.device)  # [:, 1:]: the k importance samples
    std = (0.5 * logvar).exp()

    recon = reconstruction_nats(model.decode(mu + elbo_eps * std), x)
    kl = kl_to_standard_normal(mu, logvar)

    pixels = x.shape[1]
    if dequantize:
        u = ((x.float() * 255).round() + per_image_uniforms(indices, pixels, seed, x.device)) / 256
    # IWAE, decoded in chunks of samples so that k = 5000 fits in memory.
    log_weights, log_weights_u = [], []
    chunk = max(1, IWAE_DECODES // len(x))
    for start in range(0, iwae_k, chunk):
        z = mu[:, None] + eps[:, 1 + start: 1 + start + chunk] * std[:, None]  # [B, chunk, z]
        logits = model.decode(z)  # [B, chunk, D]
        log_pz_over_qz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - \
            log_normal(z, mu[:, None], logvar[:, None])
        log_weights.append(log_pz_over_qz - reconstruction_nats(logits, x[:, None, :].expand_as(logits)))
        if dequantize:
            log_pu_z = continuous_bernoulli_log_norm(logits).sum(-1) - \
                reconstruction_nats(logits, u[:, None, :].expand_as(logits))
            log_weights_u.append(log_pz_over_qz + log_pu_z)
    scores = {"recon": recon, "kl": kl, "nelbo": recon + kl, "iwae_nll": _iwae_nll(log_weights),
              "kl_per_dim": -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()), "mu": mu}
    if dequantize:
        scores["bits_per_dim"] = (_iwae_nll(log_weights_u) + pixels * math.log(256)) / (pixels * math.log(2))
    return scores


def _iwae_nll(log_weights: list[torch.Tensor]) -> torch.Tensor:
    """-log of the mean importance weight of each image, from its chunks of log weights [B, chunk]."""
    log_w = torch.cat(log_weights, dim=1)
    return -(torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1]))


def summarize(per_image: dict[str, torch.Tensor], active_threshold: float = 0.01) -> dict:
    """Dataset-level numbers from per-image tensors gathered over all processes."""
    mu = per_image["mu"].double()
    variance = mu.var(dim=0, unbiased=False) if len(mu) > 1 else torch.zeros(mu.shape[1], dtype=torch.float64)
    return {
        "nelbo": per_image["nelbo"].double().mean().item(),
        "recon": per_image["recon"].double().mean().item(),
        "kl": per_image["kl"].double().mean().item(),
        "iwae_nll": per_image["iwae_nll"].double().mean().item(),
        **({"bits_per_dim": per_image["bits_per_dim"].double().mean().item()} if "bits_per_dim" in per_image else {}),
        "kl_per_dim": per_image["kl_per_dim"].double().mean(0).tolist(),
        "active_units": int((variance > active_threshold).sum().item()),
        "latent_variance": variance.tolist(),
        "n_images": len(mu),
    }
