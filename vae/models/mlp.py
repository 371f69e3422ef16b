"""`model.arch: mlp`, the default: the VAE of the classic PyTorch example (Kingma & Welling, 2013).

Encoder: D -> hidden (ReLU) -> mu, log sigma^2. Decoder: z -> hidden reversed (ReLU) -> D *logits*.
model.activation=tanh puts tanh where ReLU is (the IWAE paper's models).
The decoder returns logits rather than sigmoid probabilities because the loss uses
`binary_cross_entropy_with_logits`: sigmoid + BCELoss is numerically worse and raises under CUDA autocast.
Parameter names (encoder.body.0.weight, ..., decoder.out.bias) are those of the model files written before
vae/models/ existed, so those files load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .protocol import GaussianVAE

MNIST_SHAPE = (1, 28, 28)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}  # model.activation


def _mlp(widths: list[int], activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden: tuple[int, ...], pixels: int, activation: str = "relu"):
        super().__init__()
        self.body = _mlp([pixels, *hidden], activation)
        # mu and log sigma^2 come out of one Linear: one matmul instead of two, same function as the
        # tutorial's fc21/fc22 pair.
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden: tuple[int, ...], pixels: int, activation: str = "relu"):
        super().__init__()
        widths = list(reversed(hidden))
        self.body = _mlp([z_dim, *widths], activation)
        self.out = nn.Linear(widths[-1], pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))


class MLPVAE(GaussianVAE):
    """Built from z_dim, the hidden widths (the decoder mirrors them) and the activation; any image shape,
    flattened."""

    def __init__(self, z_dim: int = 2, hidden: tuple[int, ...] = (400,),
                 image_shape: tuple[int, int, int] = MNIST_SHAPE, activation: str = "relu"):
        super().__init__(z_dim, image_shape)
        self.encoder = Encoder(z_dim, hidden, self.pixels, activation)
        self.decoder = Decoder(z_dim, hidden, self.pixels, activation)

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_shape: tuple[int, int, int]) -> MLPVAE:
        return cls(z_dim=cfg.z_dim, hidden=tuple(cfg.hidden), image_shape=image_shape, activation=cfg.activation)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
