"""Training throughput: the harness's pipeline against the classic tutorial's, in one run on one machine.

    python benchmarks/throughput.py                       # CPU: batch 50, one full epoch each (60k train + 10k test)
    python benchmarks/throughput.py --batch-size 50 --train-images 2000               # a quick look
    python benchmarks/throughput.py --device cuda --json out.json  # GPU: batch 50 and 1024, plus the CUDA graph path

Every figure is train samples per second of one epoch after a warm-up; an "epoch" figure is train images /
(train time + time to score the full 10,000-image test set).

- tutorial: torchvision MNIST with ToTensor per image, a DataLoader (on a GPU with num_workers=1 and
  pin_memory=True, as the tutorial does), `.to(device)` per batch, the example's model (separate fc21/fc22,
  sigmoid + BCELoss summed), torch's default Adam. The per-step `loss.item()` and log print of the published
  loop are left out, so if anything the tutorial is measured faster than it runs. Where torchvision is not
  installed, the same per-image work (a PIL image per sample, then ToTensor's conversion) stands in for it.
  A short warm-up (20 train and 5 test batches) runs first and is not timed.
- harness: `vae.training.loop.train(cfg)`, exactly what train.py runs, for 2 epochs in a temporary run directory
  (no W&B, no figures), with the eager step (`train.cuda_graph=false`); the figures are those of the second
  epoch as written to metrics.jsonl (the first one includes start-up and warm-up).
- harness + CUDA graph (GPU only): the same with `train.cuda_graph=true`. If that fails (for example the key is
  unknown), the first line of the error is recorded and the benchmark goes on.

--train-images limits the tutorial's epoch (default 60,000 on the CPU, 20,000 on a GPU, where the tutorial is
slow and its rate settles quickly); --harness-images the harness's (default: --train-images on the CPU, all
60,000 on a GPU, where a shorter harness epoch lasts only milliseconds and would be too short to time).
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.config import config_from_dict  # noqa: E402
from vae.datasets.mnist import ensure_mnist, raw_dir  # noqa: E402
from vae.errors import first_line  # noqa: E402
from vae.training.loop import train  # noqa: E402

TEST_IMAGES = 10000


class TutorialVAE(nn.Module):
    """The model of the PyTorch VAE example, verbatim in structure."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, z_dim)
        self.fc22 = nn.Linear(400, z_dim)
        self.fc3 = nn.Linear(z_dim, 400)
        self.fc4 = nn.Linear(400, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def tutorial_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# The tutorial's data: torchvision's MNIST + ToTensor, or the same per-image work where torchvision is missing


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (big-endian dimension sizes after a 4-byte magic whose last byte is the rank) as uint8."""
    data = path.read_bytes()
    rank = data[3]
    dims = struct.unpack(f">{rank}I", data[4: 4 + 4 * rank])
    return torch.frombuffer(bytearray(data[4 + 4 * rank:]), dtype=torch.uint8).reshape(dims)


class PerImageMNIST(torch.utils.data.Dataset):
    """torchvision's MNIST + ToTensor without torchvision: per sample a PIL image, then ToTensor's steps."""

    def __init__(self, root: str, train: bool):
        prefix = "train" if train else "t10k"
        self.images = _read_idx(raw_dir(root) / f"{prefix}-images-idx3-ubyte")
        self.labels = _read_idx(raw_dir(root) / f"{prefix}-labels-idx1-ubyte").long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        import numpy as np
        from PIL import Image

        picture = Image.fromarray(self.images[index].numpy())  # what torchvision's MNIST.__getitem__ does
        pixels = torch.from_numpy(np.array(picture, np.uint8, copy=True))  # then ToTensor, step by step
        pixels = pixels.view(picture.size[1], picture.size[0], 1).permute(2, 0, 1).contiguous()
        return pixels.to(torch.get_default_dtype()).div(255), int(self.labels[index])


def tutorial_datasets(root: str) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, str]:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        return (PerImageMNIST(root, True), PerImageMNIST(root, False),
                "per-image PIL + ToTensor's conversion (torchvision not installed)")
    to_tensor = transforms.ToTensor()
    return (datasets.MNIST(root, train=True, transform=to_tensor),
            datasets.MNIST(root, train=False, transform=to_tensor), "torchvision MNIST + ToTensor")


# ---------------------------------------------------------------------------------------------------------
# The two pipelines


def run_tutorial(root: str, batch_size: int, train_images: int, device: torch.device, z_dim: int) -> dict:
    train_set, test_set, data_source = tutorial_datasets(root)
    train_set = torch.utils.data.Subset(train_set, range(train_images))
    kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, **kwargs)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False, **kwargs)
    model = TutorialVAE(z_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch(limit: int | None = None):
        model.train()
        for i, (data, _) in enumerate(train_loader):
            if limit is not None and i >= limit:
                break
            data = data.to(device)
            optimizer.zero_grad()
            recon, mu, logvar = model(data)
            tutorial_loss(recon, data, mu, logvar).backward()
            optimizer.step()
        _sync(device)

    def test(limit: int | None = None):
        model.eval()
        with torch.no_grad():
            for i, (data, _) in enumerate(test_loader):
                if limit is not None and i >= limit:
                    break
                data = data.to(device)
                recon, mu, logvar = model(data)
                tutorial_loss(recon, data, mu, logvar).item()
        _sync(device)

    epoch(limit=20), test(limit=5)  # warm-up
    return {**_time(epoch, test, train_images), "data": data_source}


def _time(epoch, test, train_images: int) -> dict:
    started = time.perf_counter()
    epoch()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    test()
    test_s = time.perf_counter() - started
    return {"train_s": train_s, "test_s": test_s, "train_samples_per_s": train_images / train_s,
            "epoch_samples_per_s": train_images / (train_s + test_s)}


def harness_config(root: str, batch_size: int, train_images: int, device: torch.device, z_dim: int,
                   run_dir: str, cuda_graph: bool):
    # The plain path is the eager step, whatever train.cuda_graph's default picks on this device
    train_section = {"epochs": 2, "batch_size": batch_size, "cpu": device.type == "cpu", "resume": False,
                     "keep_checkpoints": 1, "cuda_graph": cuda_graph}
    return config_from_dict({
        "data": {"root": root, "train_subset": train_images, "download": False},
        "model": {"z_dim": z_dim},
        "train": train_section,
        "run": {"dir": run_dir, "name": "throughput"},
        "log": {"wandb": False, "figures": False},
    })


def run_harness(root: str, batch_size: int, train_images: int, device: torch.device, z_dim: int,
                cuda_graph: bool = False) -> dict:
    """train(cfg) for 2 epochs; the second epoch's row of metrics.jsonl, the first being the warm-up."""
    with tempfile.TemporaryDirectory(prefix="vae-throughput-") as run_dir:
        train(harness_config(root, batch_size, train_images, device, z_dim, run_dir, cuda_graph))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    second = rows[1]
    train_s = train_images / second["samples_per_s"]
    return {"train_s": train_s, "test_s": second["epoch_time_s"] - train_s,
            "train_samples_per_s": second["samples_per_s"],
            "epoch_samples_per_s": train_images / second["epoch_time_s"]}


def run_harness_or_error(*args, **kwargs) -> dict:
    """The CUDA graph path may be missing or may fail on a given GPU; that is a result, not the end of the run."""
    try:
        return run_harness(*args, **kwargs)
    except Exception as error:
        return {"error": first_line(error)}


# ---------------------------------------------------------------------------------------------------------
# One batch size, the table, the command line


def measure(args, batch_size: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    result = {"batch_size": batch_size,
              "tutorial": run_tutorial(args.data_root, batch_size, args.train_images, device, args.z_dim),
              "harness": run_harness(args.data_root, batch_size, args.harness_images, device, args.z_dim)}
    if device.type == "cuda":
        result["harness_cuda_graph"] = run_harness_or_error(args.data_root, batch_size, args.harness_images,
                                                            device, args.z_dim, cuda_graph=True)
    for path in ("harness", "harness_cuda_graph"):
        if "train_samples_per_s" in result.get(path, {}):
            result[path]["x_tutorial_train"] = (result[path]["train_samples_per_s"]
                                                / result["tutorial"]["train_samples_per_s"])
            result[path]["x_tutorial_epoch"] = (result[path]["epoch_samples_per_s"]
                                                / result["tutorial"]["epoch_samples_per_s"])
    return result


PATH_NAMES = {"tutorial": "tutorial", "harness": "harness", "harness_cuda_graph": "harness + CUDA graph"}


def print_table(machine: str, results: list[dict]) -> None:
    print(f"\n{machine}")
    print(f"{'batch':>6}  {'pipeline':22}  {'train samples/s':>16}  {'epoch samples/s':>16}  {'train x tutorial':>16}")
    for result in results:
        for path, name in PATH_NAMES.items():
            if path not in result:
                continue
            r = result[path]
            if "error" in r:
                print(f"{result['batch_size']:6d}  {name:22}  failed: {r['error']}")
                continue
            ratio = f"{r['x_tutorial_train']:.1f}x" if "x_tutorial_train" in r else "1.0x"
            print(f"{result['batch_size']:6d}  {name:22}  {r['train_samples_per_s']:16,.0f}  "
                  f"{r['epoch_samples_per_s']:16,.0f}  {ratio:>16}")
    sys.stdout.flush()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="default: 50 on the CPU, 50 and 1024 on a GPU")
    parser.add_argument("--train-images", type=int, default=None,
                        help="tutorial's images per epoch (default: 60000 on the CPU, 20000 on a GPU)")
    parser.add_argument("--harness-images", type=int, default=None,
                        help="harness's images per epoch (default: --train-images on the CPU, 60000 on a GPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return parser.parse_args()


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or ([50, 1024] if gpu else [50])
    args.train_images = args.train_images or (20000 if gpu else 60000)
    args.harness_images = args.harness_images or (60000 if gpu else args.train_images)


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    resolve_defaults(args, device)
    ensure_mnist(args.data_root)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    header = (f"device: {device} ({machine}); torch {torch.__version__}; train images per epoch: tutorial "
              f"{args.train_images}, harness {args.harness_images}; each epoch also scores {TEST_IMAGES} test images")
    print(header, flush=True)
    report = {"device": str(device), "machine": machine, "torch": torch.__version__,
              "train_images": args.train_images, "harness_images": args.harness_images, "results": []}
    for batch_size in args.batch_size:
        report["results"].append(measure(args, batch_size, device))
        if args.json:  # after every batch size: a run stopped part-way still leaves what it measured
            args.json.write_text(json.dumps(report, indent=1))
    print_table(header, report["results"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
