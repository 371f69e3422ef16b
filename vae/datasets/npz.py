"""Your own images: data.name=npz, with data.train_path and data.test_path each an .npz file (numpy.savez) of

    images       uint8 [N, H, W] (grey) or [N, C, H, W] (C = 1 or 3: grey or RGB), grey levels 0-255
    labels       integers [N], 0 <= label (one class per value)
    class_names  optional: strings, the name of label k at position k (else the labels' own numbers)

Both files must hold images of one shape. Every problem is one line naming the file, what is wrong and how to fix
it, found before any training. Files are read with numpy's allow_pickle=False: an .npz can hold pickled objects,
and unpickling a file runs code of whoever wrote it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .base import DataError, ImageData

CHANNELS = (1, 3)  # what the figures can draw: grey and RGB
SAVE_HINT = "write it with numpy.savez(path, images=<uint8 [N, H, W] or [N, C, H, W]>, labels=<integers [N]>)"


def check(data: DataConfig, root_name: str = "data.root") -> None:
    """Both files exist and are files (data.root is not used)."""
    for key in ("train_path", "test_path"):
        path = Path(getattr(data, key))
        if not path.exists():
            raise DataError(f"data.{key} {path} does not exist; pass the path of your .npz file")
        if not path.is_file():
            raise DataError(f"data.{key} {path} is not a file; pass the path of your .npz file")


def prepare(data: DataConfig, say) -> None:
    check(data)  # nothing to fetch: the files are the user's


def _open(key: str, path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, never unpickled; an unreadable file or an object array is one line."""
    where = f"data.{key} {path}"
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{where} cannot be read ({e.strerror}); pass a file you can read") from None
    # np.load takes any file that is not an archive or an array for a pickle; say what the file is instead
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{where} is a single array (.npy), not an .npz archive; {SAVE_HINT}")
    if not magic.startswith(b"PK"):
        raise DataError(f"{where} is not an .npz file (not a zip archive); {SAVE_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{where} holds pickled Python objects, which are never loaded; store plain arrays "
                            f"(class_names as numpy.array(names, dtype=str)) and {SAVE_HINT}") from None
        raise DataError(f"{where} is not a readable .npz file ({e}); {SAVE_HINT}") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise DataError(f"{where} is not a readable .npz file ({type(e).__name__}: {e}); {SAVE_HINT}") from None


def _images(where: str, images: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W], or DataError."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{where}: `images` has shape {list(images.shape)}; it must be [N, H, W] or [N, C, H, W]")
    if images.shape[1] not in CHANNELS:
        flip = " (it looks like [N, H, W, C]: images.transpose(0, 3, 1, 2))" if images.shape[3] in CHANNELS else ""
        raise DataError(f"{where}: `images` has {images.shape[1]} channels in [N, C, H, W] = "
                        f"{list(images.shape)}; it must have 1 or 3{flip}")
    if len(images) == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise DataError(f"{where}: `images` has shape {list(images.shape)}, no pixels; store at least one image")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise DataError(f"{where}: `images` is {images.dtype}, it must be uint8 grey levels 0-255; from floats in "
                        f"[0, 1]: (images * 255).round().astype(numpy.uint8)")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise DataError(f"{where}: `images` holds values from {low} to {high}, outside 0-255; store grey levels "
                        f"0-255 as uint8")
    return images.astype(np.uint8)  # integers within 0-255: the same values as uint8


def _labels(where: str, labels: np.ndarray, count: int) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: `labels` is {labels.dtype}, it must be integers; store "
                        f"labels.astype(numpy.int64)")
    if labels.ndim != 1:
        raise DataError(f"{where}: `labels` has shape {list(labels.shape)}, it must be [N]: one per image")
    if len(labels) != count:
        raise DataError(f"{where}: {len(labels)} labels for {count} images; store one label per image")
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{where}: `labels` holds {int(labels.min())}; labels must be 0 or more (class indices)")
    return labels.astype(np.int64)


def _split(key: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images uint8 [N, C, H, W], labels int64 [N], class_names or None) of one file, validated."""
    where = f"data.{key} {path}"
    arrays = _open(key, path)
    for required in ("images", "labels"):
        if required not in arrays:
            raise DataError(f"{where} has no `{required}` array (it has: {', '.join(arrays) or 'nothing'}); "
                            f"{SAVE_HINT}")
    images = _images(where, arrays["images"])
    labels = _labels(where, arrays["labels"], len(images))
    names = arrays.get("class_names")
    if names is not None and (names.dtype.kind not in "US" or names.ndim != 1):
        raise DataError(f"{where}: `class_names` is {names.dtype} {list(names.shape)}; store one string per class: "
                        f"numpy.array(names, dtype=str)")
    return images, labels, names


def _class_names(data: DataConfig, names: list, most: int) -> tuple[str, ...]:
    """The files' class names (the training file's first), else the labels' numbers; every label has one."""
    for key, given in zip(("train_path", "test_path"), names, strict=True):
        if given is not None:
            given = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in given.tolist())
            if most >= len(given):
                raise DataError(f"data.{key} {getattr(data, key)}: `class_names` names {len(given)} classes, but a "
                                f"label is {most}; name every class from 0 to the largest label")
            return given
    return tuple(str(k) for k in range(most + 1))


def read(data: DataConfig) -> ImageData:
    train_images, train_labels, train_names = _split("train_path", Path(data.train_path))
    test_images, test_labels, test_names = _split("test_path", Path(data.test_path))
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"data.train_path {data.train_path} holds images of [C, H, W] = "
                        f"{list(train_images.shape[1:])}, data.test_path {data.test_path} of "
                        f"{list(test_images.shape[1:])}; both must hold images of one shape")
    most = int(max(train_labels.max(initial=0), test_labels.max(initial=0)))
    shape = tuple(int(n) for n in train_images.shape[1:])
    return ImageData(
        train_images=torch.from_numpy(np.ascontiguousarray(train_images).reshape(len(train_images), -1)),
        train_labels=torch.from_numpy(train_labels),
        test_images=torch.from_numpy(np.ascontiguousarray(test_images).reshape(len(test_images), -1)),
        test_labels=torch.from_numpy(test_labels),
        image_shape=shape,
        class_names=_class_names(data, [train_names, test_names], most),
    )
