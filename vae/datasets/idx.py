"""Datasets distributed as the four IDX files of MNIST's format (MNIST, FashionMNIST), kept in torchvision's
layout: <data.root>/<Name>/raw/.

Acquisition, in order: the files already there; then each of the dataset's sources in turn, until all four are
there. Whichever way they came, each file's size and md5 must match the original distribution's before anything
decodes it, otherwise nothing is used. One fetch per data root at a time (a lock file), also across nodes that share
the file system: the others wait, then find the files there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import first_line
from ..storage.files import open_append
from .base import DataError, ImageData, file_md5


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # in the list of what failed: "torchvision"
    how: str  # in "<Name> not found under ...; fetching it <how> ...": "with torchvision"
    fetch: Callable[[Path], None]  # puts the four files under raw_dir(root), each whole or not at all


@dataclasses.dataclass(frozen=True)
class IdxDataset:
    name: str  # in messages, and the folder under the data root (torchvision's class name)
    files: dict[str, tuple[str, int]]  # the uncompressed files: name -> (md5, size in bytes)
    sources: tuple[Source, ...]
    by_hand: Callable[[Path], str]  # raw dir -> the last resort, after "could not fetch <Name> (...). "
    fetch_hint: str  # what fetches a missing file, after "<path> is missing; "
    class_names: tuple[str, ...]

    def raw_dir(self, root: str | Path) -> Path:
        return Path(root) / self.name / "raw"

    def file_problem(self, path: Path, name: str) -> str | None:
        """Why `path` is not the original `name`, or None when its size and md5 match."""
        md5, size = self.files[name]
        actual_size = path.stat().st_size
        if actual_size != size:
            return f"has {actual_size} bytes, expected {size} (truncated or not {self.name})"
        actual = file_md5(path)
        if actual != md5:
            return f"fails its checksum (md5 {actual}, expected {md5})"
        return None

    def verify(self, root: str | Path) -> None:
        """Raise DataError unless all four raw files are present and byte-identical to the originals."""
        raw = self.raw_dir(root)
        for name in self.files:
            path = raw / name
            if not path.is_file():
                raise DataError(f"{path} is missing; {self.fetch_hint}")
            problem = self.file_problem(path, name)
            if problem is not None:
                raise DataError(f"{path} {problem}; delete it and run again to fetch a fresh copy")

    def missing(self, root: str | Path) -> list[str]:
        return [name for name in self.files if not (self.raw_dir(root) / name).is_file()]

    def _fetch(self, root: Path, say) -> None:
        failures = []
        for source in self.sources:
            say(f"{self.name} not found under {self.raw_dir(root)}; fetching it {source.how} ...")
            try:
                source.fetch(root)
            except Exception as e:  # any failure of one source just means: try the next one
                failures.append(f"{source.name}: {first_line(e)}")
            if not self.missing(root):
                return
        raise DataError(f"could not fetch {self.name} ({'; '.join(failures)}). {self.by_hand(self.raw_dir(root))}")

    @contextlib.contextmanager
    def fetch_lock(self, root: Path):
        """One fetch per data root at a time, also from several nodes that share the file system: the others wait,
        then find the files there."""
        try:
            (root / self.name).mkdir(parents=True, exist_ok=True)
            lock = open_append(root / self.name / ".fetch.lock")
        except OSError as e:
            if self.missing(root):
                raise DataError(f"cannot fetch {self.name} into {self.raw_dir(root)} ({e.strerror}); pass "
                                f"data.root=<a writable directory>, or copy the four files there") from None
            yield  # a read-only data root (shared datasets): nobody fetches into it through this harness
            return
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without flock (Lustre's noflock, some NFS): go on unlocked, as before
                pass
            yield

    def ensure(self, root: str | Path, download: bool = True, say=print) -> Path:
        """Make sure verified files are under <root>/<Name>/raw/ and return that directory."""
        root = Path(root)
        if self.missing(root) and not download:
            raise DataError(f"{self.name} files missing under {self.raw_dir(root)} ({', '.join(self.missing(root))})"
                            f" and data.download=false; set data.download=true or copy the files there")
        # Checked and verified under the lock: a fetch by another job sharing the data root finishes first.
        with self.fetch_lock(root):
            if self.missing(root):
                self._fetch(root, say)
            self.verify(root)
        return self.raw_dir(root)

    def read(self, root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(images uint8 [N, H*W], labels int64 [N], (1, H, W)) decoded from the verified IDX files, as
        torchvision decodes them (read here without importing torchvision, whose import costs a training seconds
        of start-up)."""
        prefix = "train" if train else "t10k"
        images = read_idx(self.raw_dir(root) / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(self.raw_dir(root) / f"{prefix}-labels-idx1-ubyte")
        return images.reshape(len(images), -1), labels.long(), (1, *images.shape[1:])

    def load(self, root: str | Path) -> ImageData:
        train_images, train_labels, shape = self.read(root, train=True)
        test_images, test_labels, _ = self.read(root, train=False)
        return ImageData(train_images, train_labels, test_images, test_labels, shape, self.class_names)


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes: a big-endian header (0, 0, type 0x08, number of dimensions; then each
    dimension as a 32-bit integer), then the data."""
    data = path.read_bytes()
    if data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes; delete it and run again to fetch a fresh copy")
    header = 4 + 4 * data[3]
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)  # one copy


def fetch_with_torchvision(dataset_class: str, names) -> Callable[[Path], None]:
    """A source: torchvision's own download of that dataset class (MNIST, FashionMNIST; it checks the md5 of each
    .gz it downloads) extracts the files under their final names: into a folder of its own, then each of `names`
    moved into place whole (another job reading the data root never sees half a file)."""

    def fetch(root: Path) -> None:
        import torchvision.datasets

        raw = Path(root) / dataset_class / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=raw, prefix=".torchvision-") as tmp:
            for train in (True, False):
                getattr(torchvision.datasets, dataset_class)(tmp, train=train, download=True)
            for name in names:
                os.replace(Path(tmp) / dataset_class / "raw" / name, raw / name)  # same file system: whole, or not
    return fetch
