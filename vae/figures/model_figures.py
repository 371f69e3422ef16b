"""The figures of a trained model, drawn the same way by the training loop (each epoch for W&B, at the end as PNGs)
and by evaluate.py: reconstructions, samples, the latent space, the 2-D manifold and interpolations.

matplotlib (vae.figures.plots) is imported at the first figure, not with this module: a run's first step need not wait
for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..datasets.base import DIGITS
from ..datasets.batches import to_unit_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RECONSTRUCTION_IMAGES = 10
SAMPLE_GRID = 64
MANIFOLD_SIZE = 20
INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 6, 10
FIGURE_SEED = 1234  # fixed z for the samples figure, so figures of different checkpoints are comparable
MNIST_SHAPE = (1, 28, 28)


def _decoded(model, z: torch.Tensor) -> torch.Tensor:
    """Decoder means in [0, 1]: the sigmoid of the logits [..., D] model.decode gives."""
    return torch.sigmoid(model.decode(z).float())


def _numbered_classes(labels: torch.Tensor) -> tuple[str, ...]:
    """'0', '1', ... up to the largest label, and at least MNIST's ten digits."""
    count = max(len(DIGITS), int(labels.max()) + 1 if len(labels) else 0)
    return tuple(str(k) for k in range(count))


def _interpolation_ends(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs of consecutive test images with different labels."""
    ends = []
    for i in range(len(labels) - 1):
        if labels[i] != labels[i + 1]:
            ends.append((i, i + 1))
        if len(ends) == INTERPOLATION_PAIRS:
            break
    return ends


@torch.no_grad()
def model_figures(model, test_images: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor,
                  device: torch.device, image_shape: tuple[int, int, int] | None = None,
                  class_names: tuple[str, ...] | None = None) -> dict[str, Figure]:
    """The figures of a trained model: reconstructions, samples, latent space (+ manifold for z=2),
    interpolations. model: encode(x [B, D] in [0, 1]) -> (mu, logvar), decode(z) -> logits [..., D], z_dim.
    test_images: uint8 [M, D] of images of image_shape (C, H, W): by default the model's own image_shape (which
    vae.models gives every model it builds), else MNIST's; labels: [M], named by class_names (by default their
    numbers: MNIST's digits)."""
    from . import plots

    image_shape = tuple(image_shape or getattr(model, "image_shape", MNIST_SHAPE))
    class_names = class_names or _numbered_classes(labels)
    model.eval()
    originals = to_unit_float(test_images[:RECONSTRUCTION_IMAGES].to(device))
    mu, _ = model.encode(originals)
    generator = torch.Generator().manual_seed(FIGURE_SEED)
    z = torch.randn(SAMPLE_GRID, model.z_dim, generator=generator).to(device)
    figures = {
        "reconstructions.png": plots.reconstructions(originals, _decoded(model, mu), image_shape),
        "samples.png": plots.samples(_decoded(model, z), image_shape=image_shape),
        "latent.png": plots.latent_scatter(latents, labels, class_names),
    }
    if model.z_dim == 2:
        quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, MANIFOLD_SIZE))
        z1, z0 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")  # rows: z[1] high -> low
        grid = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(device)
        figures["manifold.png"] = plots.manifold(_decoded(model, grid), quantiles, image_shape)
    ends = _interpolation_ends(labels)
    if ends:  # a test set of a single class has no pair to interpolate between
        t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=device)[:, None]
        lines = [(1 - t) * latents[a].to(device) + t * latents[b].to(device) for a, b in ends]
        figures["interpolation.png"] = plots.interpolations(_decoded(model, torch.cat(lines)), len(ends),
                                                            image_shape)
    return figures


MODEL_FIGURES = ("reconstructions.png", "samples.png", "latent.png", "manifold.png", "interpolation.png")


def save_figures(figures: dict[str, Figure], out_dir: Path) -> list[Path]:
    """The figures as PNGs in out_dir; a model figure an earlier save left there that this set does not have
    (manifold.png of a z=2 model beside a z=20 model's) is removed, so that the folder shows one model."""
    from . import plots

    if figures:
        for name in set(MODEL_FIGURES) - set(figures):
            (Path(out_dir) / name).unlink(missing_ok=True)
    return [plots.save(fig, Path(out_dir) / name) for name, fig in figures.items()]


def loss_curve(history: list[dict]) -> Figure:
    from . import plots

    return plots.loss_curve(history)
