"""The tutorial's figures as matplotlib Figures. Pure drawing: callers decide where (and whether) to save them.

Uses matplotlib's object API (no pyplot), so nothing depends on a display or a global backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import create_new

DIGIT_COLORS = "tab10"


def _grid_image(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """[N, 784] in [0, 1] -> [H, W] image of a grid of 28x28 digits, `nrow` per row, on white, laid out as
    torchvision.utils.make_grid lays them (whose package import, which pulls in torch._dynamo, would cost every
    run seconds of start-up)."""
    tiles = images.detach().float().cpu().clamp(0, 1).reshape(-1, 28, 28)
    columns = min(nrow, len(tiles))
    rows = -(-len(tiles) // columns)
    cell = 28 + padding
    grid = torch.ones(rows * cell + padding, columns * cell + padding)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * cell + padding, (index % columns) * cell + padding
        grid[top: top + 28, left: left + 28] = tile
    return grid


def loss_curve(history: list[dict]) -> Figure:
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, [row["train/loss"] for row in history], marker="o", label="train (mean over the epoch)")
    ax.plot(epochs, [row["val/loss"] for row in history], marker="o", label="test (end of epoch)")
    if history and all("val_ema/loss" in row for row in history):  # train.ema_decay: the weights' average too
        ax.plot(epochs, [row["val_ema/loss"] for row in history], marker="o", label="test, EMA of the weights")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("-ELBO (nats per image)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def val_loss_curves(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    """Several runs' test loss per epoch on one axes (python -m vae.report)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test -ELBO (nats per image)")
    ax.set_title("val/loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def reconstructions(originals: torch.Tensor, reconstructed: torch.Tensor) -> Figure:
    """Top row originals, bottom row their reconstructions (as in the tutorial)."""
    n = len(originals)
    fig = Figure(figsize=(1.0 * n, 2.4), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_grid_image(torch.cat([originals, reconstructed]), nrow=n), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([14, 44], labels=["original", "reconstruction"])
    ax.set_title("Test digits and their reconstructions (decoded posterior mean)")
    return fig


def samples(images: torch.Tensor, title: str = "Samples: decoder(z), z ~ N(0, I)") -> Figure:
    nrow = int(len(images) ** 0.5)
    fig = Figure(figsize=(6, 6.3), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_grid_image(images, nrow=nrow), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def project_2d(latents: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """The latents themselves when z=2, else their first two principal components; returns axis labels too."""
    latents = latents.detach().float().cpu()
    if latents.shape[1] == 2:
        return latents, "z[0]", "z[1]"
    if latents.shape[1] == 1:
        return torch.cat([latents, torch.zeros_like(latents)], 1), "z[0]", "(z has one dimension)"
    centered = latents - latents.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    explained = singular.pow(2) / singular.pow(2).sum()
    projected = centered @ vh[:2].T
    return projected, f"PC 1 ({explained[0]:.0%} of variance)", f"PC 2 ({explained[1]:.0%} of variance)"


def latent_scatter(latents: torch.Tensor, labels: torch.Tensor) -> Figure:
    points, xlabel, ylabel = project_2d(latents)
    z_dim = latents.shape[1]
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap=DIGIT_COLORS, s=2, alpha=0.7,
                         vmin=-0.5, vmax=9.5, rasterized=True)
    colorbar = fig.colorbar(scatter, ax=ax, ticks=range(10))
    colorbar.set_label("digit")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    how = "latent means" if z_dim <= 2 else f"latent means, 2-D PCA projection of z={z_dim}"
    ax.set_title(f"Test set in latent space ({how})")
    ax.grid(alpha=0.3)
    return fig


def save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    tmp.unlink(missing_ok=True)  # a leftover, or a link: removed, never written through (vae.files)
    with create_new(tmp) as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip("."))
    tmp.replace(path)
    return path


def manifold(images: torch.Tensor, quantiles: torch.Tensor) -> Figure:
    """Decoder outputs over a grid of standard-normal quantiles (z=2), as in Kingma & Welling's Figure 4.
    images: [n*n, 784] in row-major order of (z[1] from high to low, z[0] from low to high)."""
    n = len(quantiles)
    fig = Figure(figsize=(8, 8.4), layout="constrained")
    ax = fig.add_subplot()
    grid = _grid_image(images, nrow=n)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    centers = [2 + 30 * i + 14 for i in range(n)]
    step = max(1, n // 5)
    ax.set_xticks(centers[::step], labels=[f"{q:.2f}" for q in quantiles[::step].tolist()])
    ax.set_yticks(centers[::step], labels=[f"{q:.2f}" for q in quantiles.flip(0)[::step].tolist()])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("Learned manifold: decoder over standard-normal quantiles of z")
    return fig


def interpolations(images: torch.Tensor, pairs: int) -> Figure:
    """images: [pairs * steps, 784], one row per pair, decoded along a straight line between two latent means."""
    steps = len(images) // pairs
    fig = Figure(figsize=(0.8 * steps, 0.8 * pairs + 0.5), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(_grid_image(images, nrow=steps), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([14, 2 + 30 * (steps - 1) + 14], labels=["test digit A", "test digit B"])
    ax.set_yticks([])
    ax.set_title("Latent interpolation: decoder((1 - t) mu_A + t mu_B), t from 0 to 1")
    return fig
