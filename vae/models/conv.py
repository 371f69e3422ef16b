"""`model.arch: conv`: strided convolutions, then fully connected layers; the decoder mirrors them.

Encoder: the image [C, H, W] -> one 4x4 convolution of stride 2 per entry of model.channels, each halving the
height and width (ReLU after each) -> flattened -> model.hidden (ReLU) -> mu, log sigma^2.
Decoder: z -> model.hidden reversed (ReLU) -> the last convolution's output shape -> 4x4 transposed convolutions
of stride 2, each doubling the height and width, back to [C, H, W] *logits* (ReLU between, none after the last).

MNIST with model.channels=[32, 64]: 28x28 -> 14x14 -> 7x7, 64 x 7 x 7 = 3136 features. The height and width must
halve exactly at every convolution (divisible by 2 ** len(channels)) for the decoder to come back to them.
model.activation=tanh puts tanh where ReLU is. No normalisation layers: an image's output depends on that image
alone (vae.models.protocol).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .mlp import ACTIVATIONS, _mlp
from .protocol import GaussianVAE, ModelError

KERNEL, STRIDE, PADDING = 4, 2, 1  # output = input / 2 exactly for even sizes, in both directions


def halved_size(image_shape: tuple[int, int, int], channels: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) after the convolutions; a one-line error when a convolution cannot halve them."""
    _, height, width = image_shape
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        steps = " -> ".join(f"{height / 2 ** i:g}x{width / 2 ** i:g}" for i in range(len(channels) + 1))
        raise ModelError(f"model.arch=conv: images of shape {tuple(image_shape)} cannot be halved by "
                         f"{len(channels)} stride-2 convolutions (model.channels={list(channels)}: {steps}); use "
                         f"fewer model.channels, or images whose height and width divide by {factor}")
    return height // factor, width // factor


def _conv_stack(widths: list[int], transposed: bool, activation: str) -> nn.Sequential:
    """4x4 stride-2 convolutions between consecutive widths, the activation after each (the decoder's last
    excepted)."""
    layer = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [layer(fan_in, fan_out, KERNEL, STRIDE, PADDING), ACTIVATIONS[activation]()]
    return nn.Sequential(*(layers[:-1] if transposed else layers))


class Encoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], hidden: list[int], z_dim: int,
                 flat: int, activation: str):
        super().__init__()
        self.image_shape = image_shape
        self.convs = _conv_stack([image_shape[0], *channels], transposed=False, activation=activation)
        self.body = _mlp([flat, *hidden], activation)
        self.head = nn.Linear(hidden[-1], 2 * z_dim)  # mu and log sigma^2 from one Linear, as the mlp's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(x.reshape(len(x), *self.image_shape)).flatten(1)
        mu, logvar = self.head(self.body(h)).chunk(2, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], channels: list[int], hidden: list[int], z_dim: int,
                 features: tuple[int, int, int], activation: str):
        super().__init__()
        self.features = features  # the shape of the last convolution's output, where the decoder starts
        self.body = _mlp([z_dim, *reversed(hidden), math.prod(features)], activation)
        self.deconvs = _conv_stack([*reversed(channels), image_shape[0]], transposed=True, activation=activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Convolutions take one batch dimension: the leading ones ([B, k] importance samples) are folded into it.
        leading = z.shape[:-1]
        h = self.body(z.reshape(-1, z.shape[-1])).reshape(-1, *self.features)
        return self.deconvs(h).reshape(*leading, -1)


class ConvVAE(GaussianVAE):
    """Built from model.z_dim, model.channels and model.hidden, for any image shape the convolutions can halve."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int]):
        super().__init__(cfg.z_dim, image_shape)
        channels, hidden = list(cfg.channels), list(cfg.hidden)
        height, width = halved_size(self.image_shape, tuple(channels))
        features = (channels[-1], height, width)
        self.encoder = Encoder(self.image_shape, channels, hidden, cfg.z_dim, math.prod(features), cfg.activation)
        self.decoder = Decoder(self.image_shape, channels, hidden, cfg.z_dim, features, cfg.activation)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
