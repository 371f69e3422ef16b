"""What every dataset module shares: the decoded dataset (ImageData), its error (DataError), and the data root's
check."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from ..errors import HarnessError
from ..storage.files import file_in_the_way

DIGITS = tuple("0123456789")  # MNIST's class names, and the figures' default


class DataError(HarnessError):
    """A dataset is missing, corrupt, malformed or cannot be fetched; the message says what to do."""


@dataclasses.dataclass
class ImageData:
    """A dataset as the harness uses it: pixels as uint8 rows (grey levels 0-255, or {0, 255} once binarized),
    flattened from [N, C, H, W] in that order, so any image size or channel count is one row per image."""

    train_images: torch.Tensor  # uint8 [N, D], D = C * H * W
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, D]
    test_labels: torch.Tensor  # int64 [M]
    image_shape: tuple[int, int, int]  # (C, H, W); MNIST (1, 28, 28)
    class_names: tuple[str, ...]  # label k's name; MNIST '0'..'9'


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_data_root(root: str | Path, name: str = "data.root") -> None:
    """Before any long work: the data root is a folder, or can be made one."""
    try:
        blocker = file_in_the_way(Path(root))
    except OSError as e:  # a folder on the way that this user may not look into
        raise DataError(f"{name} {root} cannot be used ({e.strerror}: {e.filename}); pass {name}=<a folder you can "
                        f"read>") from None
    if blocker is not None:
        raise DataError(f"{name} {root} cannot be a folder: {blocker} is a file; pass {name}=<a folder>")
