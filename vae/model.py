"""The VAE of the classic PyTorch example (Kingma & Welling, 2013) and its loss, in nats per image.

Encoder: 784 -> hidden (ReLU) -> mu, log sigma^2. Decoder: z -> hidden (ReLU) -> 784 *logits*.
The decoder returns logits rather than sigmoid probabilities because the loss uses
`binary_cross_entropy_with_logits`: sigmoid + BCELoss is numerically worse and raises under CUDA autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .data import IMAGE_PIXELS


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.body = _mlp([IMAGE_PIXELS, *hidden])
        # mu and log sigma^2 come out of one Linear: one matmul instead of two, same function as the
        # tutorial's fc21/fc22 pair.
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        widths = list(reversed(hidden))
        self.body = _mlp([z_dim, *widths])
        self.out = nn.Linear(widths[-1], IMAGE_PIXELS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))


class VAE(nn.Module):
    def __init__(self, z_dim: int = 2, hidden: tuple[int, ...] = (400,)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(z_dim, hidden)
        self.decoder = Decoder(z_dim, hidden)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> VAE:
        return cls(z_dim=cfg.z_dim, hidden=tuple(cfg.hidden))

    def forward(self, x: torch.Tensor,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, 784] in [0, 1] -> (decoder logits [B, 784], mu [B, z], logvar [B, z]), z sampled once.
        noise: the N(0, I) draws [B, z] for the sample (the training step passes them in so that they do not
        depend on how a batch is split across processes); None draws them here."""
        mu, logvar = self.encoder(x)
        z = reparameterize(mu, logvar, noise)
        return self.decoder(z), mu, logvar


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): the sample stays differentiable in mu and sigma."""
    if noise is None:
        noise = torch.randn_like(mu)
    return mu + noise * torch.exp(0.5 * logvar)


def reconstruction_nats(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) under independent Bernoullis, summed over pixels: [B]. Computed in float32 even under autocast."""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) in closed form, Kingma & Welling (2013), Appendix B:
    -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2). Returns [B]."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def negative_elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                        logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (reconstruction, KL) in nats; their sum is the single-sample estimate of -ELBO."""
    return reconstruction_nats(logits, x), kl_to_standard_normal(mu, logvar)

