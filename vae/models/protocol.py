"""The contract every model follows, and `GaussianVAE`, the base class that implements most of it.

The harness calls only these (docs/models.md):

    model = Class.from_config(cfg: ModelConfig, image_shape: tuple[int, int, int])   # (C, H, W)
    model.z_dim                                   -> int, equal to cfg.z_dim
    model.encode(x [B, D])                        -> (mu [B, z], logvar [B, z])   D = C * H * W
    model.decode(z [..., z])                      -> Bernoulli logits [..., D]   (any leading dimensions)
    model(x [B, D], noise [B, z] or [B, k, z])    -> (logits [B, D] or [B, k, D], mu [B, z], logvar [B, z])

x is float32 in [0, 1]: the images flattened channel by channel, row by row. The loss is not the model's:
vae.models.objectives computes the Bernoulli reconstruction and the KL to N(0, I) from (logits, mu, logvar).

Two rules keep 1 and N processes training the same model (vae.models.conformance checks both when a model is
built): every random draw is the `noise` the harness passes in (no dropout, no torch.randn inside), and the output
for an image depends on that image alone (no BatchNorm in training mode, nothing mixing the images of a batch).
"""

from __future__ import annotations

import abc
import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import HarnessError


class ModelError(HarnessError):
    """A model that cannot be built or does not follow the contract; one line naming the rule and the fix."""


@runtime_checkable
class VAE(Protocol):
    """The type every model of the harness has (GaussianVAE's subclasses, or any nn.Module with these members)."""

    z_dim: int
    image_shape: tuple[int, int, int]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): the sample stays differentiable in mu and sigma.
    noise [B, z] gives z [B, z]; noise [B, k, z] gives k samples per image, z [B, k, z]."""
    if noise is None:
        noise = torch.randn_like(mu)
    if noise.dim() == mu.dim() + 1:
        return mu[:, None] + noise * torch.exp(0.5 * logvar)[:, None]
    return mu + noise * torch.exp(0.5 * logvar)


class GaussianVAE(nn.Module, metaclass=abc.ABCMeta):
    """A VAE with a diagonal Gaussian posterior: a subclass writes `__init__(self, cfg, image_shape)` (calling
    `super().__init__(cfg.z_dim, image_shape)` first), `encode` and `decode`; this class gives `from_config`,
    `forward` (the reparameterised sample, one or k per image) and `pixels`."""

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.z_dim = int(z_dim)
        self.image_shape = tuple(int(n) for n in image_shape)

    @property
    def pixels(self) -> int:
        """D = C * H * W: the length of an image as the model receives it."""
        return math.prod(self.image_shape)

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_shape: tuple[int, int, int]) -> GaussianVAE:
        return cls(cfg, image_shape)

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] in [0, 1] -> (mu [B, z], logvar [B, z]) of q(z|x)."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., z] -> Bernoulli logits [..., D] of p(x|z)."""

    def forward(self, x: torch.Tensor,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, D] -> (logits, mu [B, z], logvar [B, z]). noise: the N(0, I) draws, [B, z] for one sample per
        image (logits [B, D]) or [B, k, z] for k (logits [B, k, D]); the training step passes them in so that
        they do not depend on how a batch is split across processes. None draws one sample here."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar, noise)), mu, logvar
