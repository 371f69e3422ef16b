"""The figures' building blocks, the figures of datasets other than MNIST (any image shape, grey or RGB, their
class names), and the start-up they must not cost."""

import subprocess
import sys

import pytest
import torch

from vae.figures.plots import _grid_image

from .conftest import REPO

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@pytest.mark.parametrize("count, per_row", [(20, 10), (64, 8), (23, 8), (3, 5), (400, 20)])
def test_digit_grid_is_laid_out_as_torchvision_make_grid(count, per_row):
    from torchvision.utils import make_grid

    images = torch.rand(count, 784)
    expected = make_grid(images.reshape(-1, 1, 28, 28), nrow=per_row, padding=2, pad_value=1.0)[0]
    assert torch.equal(_grid_image(images, per_row), expected)


@pytest.mark.parametrize("count, per_row", [(20, 10), (23, 8)])
def test_an_rgb_grid_is_laid_out_as_torchvision_make_grid(count, per_row):
    from torchvision.utils import make_grid

    images = torch.rand(count, 3 * 32 * 20)  # not square: height and width must not be swapped
    expected = make_grid(images.reshape(-1, 3, 32, 20), nrow=per_row, padding=2, pad_value=1.0).permute(1, 2, 0)
    assert torch.equal(_grid_image(images, per_row, (3, 32, 20)), expected)


FIRST_STEP_PROBE = """
import os, sys
import vae.training.step
from vae.config import load_config
from vae.training.loop import train

def first_step(*args):  # the first training step: say what is imported by now, and stop
    print(sorted(m for m in ("torchvision", "matplotlib", "wandb") if m in sys.modules), flush=True)
    os._exit(0)

vae.training.step.TrainStep.__call__ = first_step
train(load_config("configs/debug.yaml", sys.argv[1:]))
"""


def test_a_run_imports_no_plotting_tracking_or_torchvision_before_its_first_step(tmp_path, mnist_root):
    """torchvision's import pulls in torch._dynamo, matplotlib's takes a second, wandb's several: none of them is
    needed before the first training step (the figures import matplotlib when the first one is drawn; wandb is
    imported only with log.wandb=true)."""
    result = subprocess.run([sys.executable, "-c", FIRST_STEP_PROBE, f"run.dir={tmp_path / 'r'}",
                             f"data.root={mnist_root}", "log.wandb=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_loss_curve_shows_the_weights_average_when_the_run_keeps_one():
    from vae.figures.plots import loss_curve

    rows = [{"epoch": e, "train/loss": 200.0 - e, "val/loss": 190.0 - e, "val_ema/loss": 180.0 - e} for e in (1, 2)]
    lines = loss_curve(rows).axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[199, 198], [189, 188], [179, 178]]
    assert "EMA" in lines[2].get_label()
    without = [{key: value for key, value in row.items() if key != "val_ema/loss"} for row in rows]
    assert len(loss_curve(without).axes[0].get_lines()) == 2


def test_a_figure_an_earlier_model_left_in_the_folder_is_removed(tmp_path):
    from matplotlib.figure import Figure

    from vae.figures.model_figures import save_figures

    (tmp_path / "manifold.png").write_bytes(b"a z=2 model's")  # an earlier evaluation's, into the same --out-dir
    (tmp_path / "notes.txt").write_text("mine")
    saved = save_figures({"samples.png": Figure(figsize=(1, 1))}, tmp_path)
    assert saved == [tmp_path / "samples.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "samples.png"]


class PatternVAE(torch.nn.Module):
    """A model of the protocol the figures use (encode -> (mu, logvar), decode -> logits [..., D], z_dim) whose
    decoder draws smooth patterns: z[0] a left-right ramp in the first channel, z[1] a top-bottom ramp in the last,
    so its manifold and interpolations visibly change across the grid."""

    def __init__(self, image_shape, z_dim=2):
        super().__init__()
        channels, height, width = image_shape
        rows, columns = torch.meshgrid(torch.linspace(-3, 3, height), torch.linspace(-3, 3, width), indexing="ij")
        basis = torch.zeros(z_dim, channels, height, width)
        basis[0, 0], basis[1, -1] = columns, rows
        self.basis, self.z_dim = basis.reshape(z_dim, -1), z_dim

    def encode(self, x):
        mu = (x - 0.5) @ self.basis.T / self.basis.pow(2).sum(1)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return z @ self.basis


def _test_set(image_shape, classes: int, count: int = 300):
    """uint8 images of image_shape: a bright square whose place and colour follow the label; labels cycle."""
    channels, height, width = image_shape
    labels = torch.arange(count) % classes
    images = torch.zeros(count, channels, height, width, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        top, left = (label * 5) % (height - 8), (label * 7) % (width - 8)
        images[i, label % channels, top: top + 8, left: left + 8] = 255
    return images.reshape(count, -1), labels


def _drawn(name, figures):
    """The image the figure shows, as imshow holds it."""
    return figures[name].axes[0].get_images()[0].get_array()


def _colorbar_labels(figure):
    return [label.get_text() for label in figure.axes[1].get_yticklabels()]


def _class_colors(figure):
    points = figure.axes[0].collections[0]
    points.update_scalarmappable()
    return {tuple(color) for color in points.get_facecolors().round(decimals=4).tolist()}


def test_the_figures_of_a_3x32x32_dataset_are_rgb_grids_of_its_images(tmp_path):
    from vae.figures.model_figures import model_figures, save_figures

    shape, names = (3, 32, 32), tuple(f"class {k}" for k in range(12))
    images, labels = _test_set(shape, classes=12)
    model = PatternVAE(shape)
    latents = model.encode(images.float() / 255)[0]
    figures = model_figures(model, images, latents, labels, torch.device("cpu"), shape, names)
    assert sorted(figures) == ["interpolation.png", "latent.png", "manifold.png", "reconstructions.png",
                               "samples.png"]
    cell = 32 + 2
    assert _drawn("reconstructions.png", figures).shape == (2 * cell + 2, 10 * cell + 2, 3)
    assert _drawn("samples.png", figures).shape == (8 * cell + 2, 8 * cell + 2, 3)
    assert _drawn("manifold.png", figures).shape == (20 * cell + 2, 20 * cell + 2, 3)
    assert _drawn("interpolation.png", figures).shape == (6 * cell + 2, 10 * cell + 2, 3)
    top_left = _drawn("reconstructions.png", figures)[2: 2 + 32, 2: 2 + 32]  # the first test image, as it is
    assert torch.equal(torch.as_tensor(top_left).permute(2, 0, 1).reshape(-1), images[0].float() / 255)
    assert _colorbar_labels(figures["latent.png"]) == list(names)
    assert len(_class_colors(figures["latent.png"])) == 12  # one colour per class, none shared
    saved = save_figures(figures, tmp_path)
    assert all(path.stat().st_size > 1000 for path in saved)


def test_figures_default_to_the_models_image_shape_and_numbered_classes():
    """A caller that passes neither (the training loop before it knew of datasets): the shape the model was built
    for (vae.models sets model.image_shape), and the labels' numbers as names, however many classes there are."""
    from vae.figures.model_figures import model_figures

    shape = (3, 16, 24)
    images, labels = _test_set(shape, classes=12)
    model = PatternVAE(shape)
    model.image_shape = shape
    figures = model_figures(model, images, model.encode(images.float() / 255)[0], labels, torch.device("cpu"))
    assert _drawn("samples.png", figures).shape == (8 * 18 + 2, 8 * 26 + 2, 3)
    assert _colorbar_labels(figures["latent.png"]) == [str(k) for k in range(12)]


def test_the_latent_figure_names_fashion_mnists_classes():
    from vae.figures.model_figures import model_figures

    shape = (1, 28, 28)
    images, labels = _test_set(shape, classes=10)
    model = PatternVAE(shape)
    figures = model_figures(model, images, model.encode(images.float() / 255)[0], labels, torch.device("cpu"),
                            shape, FASHION_CLASSES)
    assert _colorbar_labels(figures["latent.png"]) == list(FASHION_CLASSES)
    assert figures["latent.png"].axes[1].get_ylabel() == "class"
    assert len(_class_colors(figures["latent.png"])) == 10
    assert _drawn("reconstructions.png", figures).shape == (2 * 30 + 2, 10 * 30 + 2)  # grey: one channel


def test_many_classes_keep_distinct_colours_and_a_readable_colour_bar():
    from vae.figures.plots import MAX_CLASS_TICKS, latent_scatter

    for count in (20, 45):
        names = tuple(f"c{k}" for k in range(count))
        labels = torch.arange(count).repeat(3)
        figure = latent_scatter(torch.randn(len(labels), 2), labels, names)
        assert len(_class_colors(figure)) == count
        every = -(-count // MAX_CLASS_TICKS)
        assert _colorbar_labels(figure) == list(names[::every])
