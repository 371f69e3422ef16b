"""Test-set metrics of a trained VAE that do not depend on how the images are split across processes.

Every random draw for image i comes from a generator seeded with (seed, i): the same image gets the same noise
whether it is scored by process 0 of 1 or process 3 of 4, so 1-process and N-process numbers are equal.

Per image, in nats:
- recon, kl, nelbo: single-sample estimate of -ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)) (KL in closed form)
- iwae_nll: -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al., 2015), an upper bound on
  -log p(x) that tightens as k grows; at k = 1 it is the single-sample -ELBO (with the sampled KL).
"""

from __future__ import annotations

import math

import torch

from .models import VAE
from .objectives import kl_to_standard_normal, log_normal, reconstruction_nats

# The k importance samples of a batch's images are decoded at most this many at a time, a chunk of samples per
# image: the memory is this many times what the decoder holds per sample (about 5 KB for the tutorial's mlp,
# 80 KB for configs/z20_conv.yaml's conv), whatever the batch size and k.
IWAE_DECODES = 8192


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
def score_batch(model: VAE, x: torch.Tensor, indices: torch.Tensor, *, iwae_k: int, seed: int) -> dict:
    """Per-image metrics for one batch: x [B, D] in [0, 1], indices [B] global image indices."""
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

    # IWAE, decoded in chunks of samples so that k = 5000 fits in memory.
    log_weights = []
    chunk = max(1, IWAE_DECODES // len(x))
    for start in range(0, iwae_k, chunk):
        z = mu[:, None] + eps[:, 1 + start: 1 + start + chunk] * std[:, None]  # [B, chunk, z]
        logits = model.decode(z)  # [B, chunk, D]
        log_px_z = -reconstruction_nats(logits, x[:, None, :].expand_as(logits))
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz = log_normal(z, mu[:, None], logvar[:, None])
        log_weights.append(log_px_z + log_pz - log_qz)
    log_w = torch.cat(log_weights, dim=1)
    iwae_nll = -(torch.logsumexp(log_w, dim=1) - math.log(iwae_k))

    kl_per_dim = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())
    return {"recon": recon, "kl": kl, "nelbo": recon + kl, "iwae_nll": iwae_nll, "kl_per_dim": kl_per_dim,
            "mu": mu}


def summarize(per_image: dict[str, torch.Tensor], active_threshold: float = 0.01) -> dict:
    """Dataset-level numbers from per-image tensors gathered over all processes."""
    mu = per_image["mu"].double()
    variance = mu.var(dim=0, unbiased=False) if len(mu) > 1 else torch.zeros(mu.shape[1], dtype=torch.float64)
    return {
        "nelbo": per_image["nelbo"].double().mean().item(),
        "recon": per_image["recon"].double().mean().item(),
        "kl": per_image["kl"].double().mean().item(),
        "iwae_nll": per_image["iwae_nll"].double().mean().item(),
        "kl_per_dim": per_image["kl_per_dim"].double().mean(0).tolist(),
        "active_units": int((variance > active_threshold).sum().item()),
        "latent_variance": variance.tolist(),
        "n_images": len(mu),
    }
