"""Shared fixtures: the real MNIST files, and running the real entry points as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DATA_ROOT = Path(os.environ.get("VAE_TEST_DATA", REPO / "data"))
# Port 0: Accelerate picks a free rendezvous port, so multi-process tests can run side by side (pytest -n).
ACCELERATE_LAUNCH = [str(VENV_BIN / "accelerate"), "launch", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """A module of small models on one torch thread (pytestmark = pytest.mark.usefixtures("one_torch_thread")): on
    a busy 2-core machine two threads wait for each other at every operator, several times slower than one, and
    what these tests compare does not depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The repository's data/ folder with verified MNIST (fetched once if missing, as `make data` does)."""
    from vae.datasets.mnist import ensure_mnist

    ensure_mnist(DATA_ROOT, download=True)
    return DATA_ROOT


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.update({"PYTHONUNBUFFERED": "1", "TERM": "dumb"})
    env.setdefault("WANDB_MODE", "offline")  # a logged-in developer machine must not upload test runs
    env.update(extra or {})
    return {name: value for name, value in env.items() if value is not None}  # None in `extra`: unset it


def run_cmd(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env(env),
                          stdin=subprocess.DEVNULL)


def python(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, *args], **kw)


def accelerate_launch(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd([*ACCELERATE_LAUNCH, *args], **kw)


def train_cmd(run_dir: Path, mnist_root: Path, *overrides: str, config: str = "configs/debug.yaml",
              wandb: bool = False, figures: bool = False) -> list[str]:
    """train.py's arguments. W&B and the end-of-run PNG figures are off unless a test is about them (wandb=True,
    figures=True, or log.wandb=true / log.figures=true among the overrides, which come later and win): starting W&B
    costs seconds per run, and drawing and saving the figures more CPU time than a short training itself."""
    quiet = ([] if wandb else ["log.wandb=false"]) + ([] if figures else ["log.figures=false"])
    return ["train.py", "--config", config, f"run.dir={run_dir}", f"data.root={mnist_root}", *quiet, *overrides]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n" \
                                   f"stderr:\n{result.stderr[-3000:]}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def epochs_in(run_dir: Path) -> list[int]:
    """The epochs in a run's metrics.jsonl so far ([] before the first; a line being written is left out)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    epochs = []
    for line in lines:
        try:
            epochs.append(json.loads(line)["epoch"])
        except (ValueError, KeyError, TypeError):
            pass
    return epochs


def start(args: list[str], launcher: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
    """A running entry point (python, or the given launcher command), in its own session so that a test can
    signal it and all its children."""
    command = [*launcher, *args] if launcher else [sys.executable, *args]
    return subprocess.Popen(command, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_until(condition, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
