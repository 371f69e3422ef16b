"""The figures of a trained model, drawn the same way by the training loop (each epoch for W&B, at the end as PNGs)
and by evaluate.py: reconstructions, samples, the latent space, the 2-D manifold and interpolations.

matplotlib (vae.plots) is imported at the first figure, not with this module: a run's first step need not wait
for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import to_unit_float
from .model import VAE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RECONSTRUCTION_DIGITS = 10
SAMPLE_GRID = 64
MANIFOLD_SIZE = 20
INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 6, 10
FIGURE_SEED = 1234  # fixed z for the samples figure, so figures of different checkpoints are comparable


@torch.no_grad()
def model_figures(model: VAE, test_images: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict[str, Figure]:
    """The figures of a trained model: reconstructions, samples, latent space (+ manifold for z=2),
    interpolations."""
    from . import plots

    model.eval()
    originals = to_unit_float(test_images[:RECONSTRUCTION_DIGITS].to(device))
    mu, _ = model.encoder(originals)
    generator = torch.Generator().manual_seed(FIGURE_SEED)
    z = torch.randn(SAMPLE_GRID, model.z_dim, generator=generator).to(device)
    figures = {
        "reconstructions.png": plots.reconstructions(originals, torch.sigmoid(model.decoder(mu))),
        "samples.png": plots.samples(torch.sigmoid(model.decoder(z))),
        "latent.png": plots.latent_scatter(latents, labels),
    }
    if model.z_dim == 2:
        quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, MANIFOLD_SIZE))
        z1, z0 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")  # rows: z[1] high -> low
        grid = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(device)
        figures["manifold.png"] = plots.manifold(torch.sigmoid(model.decoder(grid)), quantiles)
    # Pairs of consecutive test digits with different labels.
    ends = []
    for i in range(len(labels) - 1):
        if labels[i] != labels[i + 1]:
            ends.append((i, i + 1))
        if len(ends) == INTERPOLATION_PAIRS:
            break
    t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=device)[:, None]
    lines = [(1 - t) * latents[a].to(device) + t * latents[b].to(device) for a, b in ends]
    figures["interpolation.png"] = plots.interpolations(torch.sigmoid(model.decoder(torch.cat(lines))), len(ends))
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
