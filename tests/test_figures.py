"""The figures' building blocks, and the start-up they must not cost."""

import subprocess
import sys

import pytest
import torch

from vae.plots import _grid_image

from .conftest import REPO


@pytest.mark.parametrize("count, per_row", [(20, 10), (64, 8), (23, 8), (3, 5), (400, 20)])
def test_digit_grid_is_laid_out_as_torchvision_make_grid(count, per_row):
    from torchvision.utils import make_grid

    images = torch.rand(count, 784)
    expected = make_grid(images.reshape(-1, 1, 28, 28), nrow=per_row, padding=2, pad_value=1.0)[0]
    assert torch.equal(_grid_image(images, per_row), expected)


FIRST_STEP_PROBE = """
import os, sys
import vae.step
from vae.config import load_config
from vae.training import train

def first_step(*args):  # the first training step: say what is imported by now, and stop
    print(sorted(m for m in ("torchvision", "matplotlib", "wandb") if m in sys.modules), flush=True)
    os._exit(0)

vae.step.TrainStep.__call__ = first_step
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
    from vae.plots import loss_curve

    rows = [{"epoch": e, "train/loss": 200.0 - e, "val/loss": 190.0 - e, "val_ema/loss": 180.0 - e} for e in (1, 2)]
    lines = loss_curve(rows).axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[199, 198], [189, 188], [179, 178]]
    assert "EMA" in lines[2].get_label()
    without = [{key: value for key, value in row.items() if key != "val_ema/loss"} for row in rows]
    assert len(loss_curve(without).axes[0].get_lines()) == 2


def test_a_figure_an_earlier_model_left_in_the_folder_is_removed(tmp_path):
    from matplotlib.figure import Figure

    from vae.figures import save_figures

    (tmp_path / "manifold.png").write_bytes(b"a z=2 model's")  # an earlier evaluation's, into the same --out-dir
    (tmp_path / "notes.txt").write_text("mine")
    saved = save_figures({"samples.png": Figure(figsize=(1, 1))}, tmp_path)
    assert saved == [tmp_path / "samples.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "samples.png"]
