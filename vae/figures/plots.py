"""The tutorial's figures as matplotlib Figures. Pure drawing: callers decide where (and whether) to save them.

Images come as rows [N, D] in [0, 1], D = C * H * W flattened from [C, H, W] (`image_shape`): grey (C = 1) or RGB
(C = 3), of any size. Uses matplotlib's object API (no pyplot), so nothing depends on a display or a global
backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..datasets.base import DIGITS
from ..storage.files import create_new

MNIST_SHAPE = (1, 28, 28)
PADDING = 2  # pixels of white between the images of a grid
MAX_CLASS_TICKS = 30  # more class names than this on the colour bar would overlap: every k-th is written


def _grid_image(images: torch.Tensor, nrow: int, image_shape: tuple[int, int, int] = MNIST_SHAPE,
                padding: int = PADDING) -> torch.Tensor:
    """[N, D] in [0, 1] -> one image of a grid of them, `nrow` per row, on white, laid out as
    torchvision.utils.make_grid lays them (whose package import, which pulls in torch._dynamo, would cost every
    run seconds of start-up): [height, width] for grey images, [height, width, 3] for RGB (as imshow takes them)."""
    channels, height, width = image_shape
    tiles = images.detach().float().cpu().clamp(0, 1).reshape(-1, channels, height, width)
    columns = min(nrow, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index, tile in enumerate(tiles):
        top = (index // columns) * (height + padding) + padding
        left = (index % columns) * (width + padding) + padding
        grid[:, top: top + height, left: left + width] = tile
    return grid[0] if channels == 1 else grid.permute(1, 2, 0)


def _show_grid(ax, images: torch.Tensor, nrow: int, image_shape: tuple[int, int, int]) -> None:
    # grey images through a grey colormap from 0 to 1; RGB ones are their own colours
    ax.imshow(_grid_image(images, nrow, image_shape).numpy(), cmap="gray", vmin=0, vmax=1)


def _centers(count: int, size: int) -> list[float]:
    """Where the middle of each of `count` tiles of `size` pixels lies along a grid's axis (for tick marks)."""
    return [PADDING + (size + PADDING) * i + size / 2 for i in range(count)]


def class_colors(count: int) -> ListedColormap:
    """One distinct colour per class: tab10 up to 10 classes; up to 20, tab20's ten dark shades, then its ten light
    ones (in its own order a dark and a light shade of one hue alternate, and neighbouring classes would look
    alike); beyond that, evenly spaced hues of turbo (no palette keeps dozens of classes each recognisable)."""
    from matplotlib import colormaps

    if count <= 10:
        colors = colormaps["tab10"].colors[:count]
    elif count <= 20:
        tab20 = colormaps["tab20"].colors
        colors = (tab20[0::2] + tab20[1::2])[:count]
    else:
        colors = colormaps["turbo"](torch.linspace(0.0, 1.0, count).tolist())
    return ListedColormap(colors, name=f"classes{count}")


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


def reconstructions(originals: torch.Tensor, reconstructed: torch.Tensor,
                    image_shape: tuple[int, int, int] = MNIST_SHAPE) -> Figure:
    """Top row originals, bottom row their reconstructions (as in the tutorial)."""
    n = len(originals)
    fig = Figure(figsize=(1.0 * n, 2.4), layout="constrained")
    ax = fig.add_subplot()
    _show_grid(ax, torch.cat([originals, reconstructed]), n, image_shape)
    ax.set_xticks([])
    ax.set_yticks(_centers(2, image_shape[1]), labels=["original", "reconstruction"])
    ax.set_title("Test images and their reconstructions (decoded posterior mean)")
    return fig


def samples(images: torch.Tensor, title: str = "Samples: decoder(z), z ~ N(0, I)",
            image_shape: tuple[int, int, int] = MNIST_SHAPE) -> Figure:
    nrow = int(len(images) ** 0.5)
    fig = Figure(figsize=(6, 6.3), layout="constrained")
    ax = fig.add_subplot()
    _show_grid(ax, images, nrow, image_shape)
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


def latent_scatter(latents: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...] = DIGITS) -> Figure:
    """The test set's latent means, coloured by class, the colour bar naming the classes."""
    points, xlabel, ylabel = project_2d(latents)
    z_dim, count = latents.shape[1], len(class_names)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    scatter = ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=labels.cpu().numpy(), s=2, alpha=0.7,
                         cmap=class_colors(count), vmin=-0.5, vmax=count - 0.5, rasterized=True)
    every = -(-count // MAX_CLASS_TICKS)
    colorbar = fig.colorbar(scatter, ax=ax, ticks=range(0, count, every))
    colorbar.set_ticklabels(class_names[::every])
    colorbar.set_label("class")
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
    tmp.unlink(missing_ok=True)  # a leftover, or a link: removed, never written through (vae.storage.files)
    with create_new(tmp) as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip("."))
    tmp.replace(path)
    return path


def manifold(images: torch.Tensor, quantiles: torch.Tensor, image_shape: tuple[int, int, int] = MNIST_SHAPE) -> Figure:
    """Decoder outputs over a grid of standard-normal quantiles (z=2), as in Kingma & Welling's Figure 4.
    images: [n*n, D] in row-major order of (z[1] from high to low, z[0] from low to high)."""
    n = len(quantiles)
    fig = Figure(figsize=(8, 8.4), layout="constrained")
    ax = fig.add_subplot()
    _show_grid(ax, images, n, image_shape)
    step = max(1, n // 5)
    ax.set_xticks(_centers(n, image_shape[2])[::step], labels=[f"{q:.2f}" for q in quantiles[::step].tolist()])
    ax.set_yticks(_centers(n, image_shape[1])[::step],
                  labels=[f"{q:.2f}" for q in quantiles.flip(0)[::step].tolist()])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("Learned manifold: decoder over standard-normal quantiles of z")
    return fig


def interpolations(images: torch.Tensor, pairs: int, image_shape: tuple[int, int, int] = MNIST_SHAPE) -> Figure:
    """images: [pairs * steps, D], one row per pair, decoded along a straight line between two latent means."""
    steps = len(images) // pairs
    fig = Figure(figsize=(0.8 * steps, 0.8 * pairs + 0.5), layout="constrained")
    ax = fig.add_subplot()
    _show_grid(ax, images, steps, image_shape)
    ends = _centers(steps, image_shape[2])
    ax.set_xticks([ends[0], ends[-1]], labels=["test image A", "test image B"])
    ax.set_yticks([])
    ax.set_title("Latent interpolation: decoder((1 - t) mu_A + t mu_B), t from 0 to 1")
    return fig
