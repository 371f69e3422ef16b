"""FashionMNIST (Xiao, Rasul and Vollgraf, 2017: Zalando's article images, MNIST's format and sizes):
data.name=fashion_mnist. Files under <data.root>/FashionMNIST/raw/.

Sources, in order: torchvision's own download (its mirror); Debian's package dataset-fashion-mnist, which installs
the four files gzip-compressed under /usr/share/datasets/fashion-mnist/ (no network needed). Debian recompressed
them, so the .gz files differ from the original ones: what is pinned is each decompressed file's md5 and size,
the same whichever source it came from.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

from ..config import DataConfig
from .base import DataError, ImageData, check_data_root
from .idx import IdxDataset, Source, fetch_with_torchvision

# The uncompressed files of the original distribution (github.com/zalandoresearch/fashion-mnist):
# name -> (md5, size in bytes).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47040016),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60008),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7840016),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10008),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Where the Debian package puts its files. Looked up when a fetch runs, not at import, so that a test can point it
# at an empty folder: the package is installed on the machines that run the tests, and "not installed" can be
# tried no other way.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _copy_from_debian(root: Path) -> None:
    """Each .gz decompressed into a temporary file, checked against the original's size and md5, then moved into
    place whole: a damaged package never leaves a file under the real name."""
    source = DEBIAN_DIR
    if not source.is_dir():
        raise DataError(f"{source} does not exist (Debian's package {DEBIAN_PACKAGE} is not installed)")
    raw = FASHION_MNIST.raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw, prefix=".debian-") as tmp:
        for name in FASHION_MNIST_FILES:
            partial = Path(tmp) / name
            with gzip.open(source / f"{name}.gz") as compressed, partial.open("wb") as out:
                shutil.copyfileobj(compressed, out)
            problem = FASHION_MNIST.file_problem(partial, name)
            if problem is not None:
                raise DataError(f"{source / name}.gz: its decompressed file {problem}; reinstall the package "
                                f"(apt install --reinstall {DEBIAN_PACKAGE})")
            os.replace(partial, raw / name)


FASHION_MNIST = IdxDataset(
    name="FashionMNIST",
    files=FASHION_MNIST_FILES,
    sources=(Source("torchvision", "with torchvision", fetch_with_torchvision("FashionMNIST", FASHION_MNIST_FILES)),
             Source(f"Debian's {DEBIAN_PACKAGE}", f"from Debian's package {DEBIAN_PACKAGE}", _copy_from_debian)),
    by_hand=lambda raw: (f"Either install Debian's package (`apt install {DEBIAN_PACKAGE}`, which puts the files "
                         f"in {DEBIAN_DIR}/), or copy the four uncompressed files {', '.join(FASHION_MNIST_FILES)} "
                         f"into {raw}/ by hand; then run again"),
    fetch_hint="run again with data.download=true to fetch it",
    class_names=CLASS_NAMES,
)


def check(data: DataConfig, root_name: str = "data.root") -> None:
    check_data_root(data.root, root_name)


def prepare(data: DataConfig, say) -> None:
    FASHION_MNIST.ensure(data.root, download=data.download, say=say)


def read(data: DataConfig) -> ImageData:
    return FASHION_MNIST.load(data.root)
