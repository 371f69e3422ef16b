"""The dataset as training uses it: each epoch's batches as whole-batch tensor indexing, each process's share.

The datasets themselves (MNIST, FashionMNIST, your own .npz; fetched, checksummed, decoded, binarized) are the
rest of vae.datasets.

The images are uint8 rows [N, D], D = C * H * W. Training draws its batches itself (`EpochBatches`): one shuffled
order per epoch, and each batch one gather from the uint8 tensor on the device, not 50 PIL images through ToTensor;
no step waits for the host. Each of N processes takes its contiguous share of every batch (`share_bounds`) and
results come back in image order (`gather_shares`). Pixels become floats in [0, 1] on the device
(`to_unit_float`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from . import DataError, load_dataset

IMAGE_PIXELS = 28 * 28  # MNIST's; the dataset's own is TrainingData.image_shape


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, D] -> float32 in [0, 1], on whatever device the batch is."""
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
    train_images: torch.Tensor  # uint8 [N, D], on the data's device (with data.binarize=static: {0, 255})
    test_images: torch.Tensor  # uint8 [M, D], on the CPU (for the figures); binarized unless data.binarize=none
    test_images_here: torch.Tensor  # the same, on the data's device
    test_labels: torch.Tensor
    test_noise: torch.Tensor  # one N(0, I) draw per test image, on the model's device
    batches: EpochBatches
    image_shape: tuple[int, int, int]  # (C, H, W): D = C * H * W
    class_names: tuple[str, ...]  # label k's name
    train_labels: torch.Tensor  # int64 [N], on the CPU


def load_training_data(cfg: Config, accelerator, say=print) -> TrainingData:
    """The training images (on the device with data.on_device), the test set and its fixed noise, the batches."""
    # The node's first process fetches and verifies; the others then only verify.
    dataset = load_dataset(cfg.data, say, fetching=accelerator.local_main_process_first())
    if cfg.data.train_subset is not None and cfg.data.train_subset > len(dataset.train_images):
        raise DataError(f"data.train_subset: {cfg.data.train_subset} is more than the {len(dataset.train_images)} "
                        f"training images of {cfg.data.name}; lower it, or null for all of them")
    train_images = dataset.train_images[: cfg.data.train_subset]
    test_images = dataset.test_images
    on_device = cfg.data.on_device if cfg.data.on_device is not None else accelerator.device.type == "cuda"
    data_device = accelerator.device if on_device else torch.device("cpu")
    train_images = train_images.to(data_device)
    # The test pass's noise: one fixed draw per image, so val/loss moves only with the model, and is the same
    # on any device and any number of processes.
    test_noise = torch.randn(len(test_images), cfg.model.z_dim,
                             generator=torch.Generator().manual_seed(cfg.train.seed)).to(accelerator.device)
    batches = EpochBatches(train_images, cfg.train.update_batch, cfg.train.seed, accelerator.process_index,
                           accelerator.num_processes)
    return TrainingData(train_images, test_images, test_images.to(data_device), dataset.test_labels, test_noise,
                        batches, dataset.image_shape, dataset.class_names,
                        dataset.train_labels[: cfg.data.train_subset])
