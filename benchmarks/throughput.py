"""Training throughput: the harness's pipeline against the classic tutorial's, in one run on one machine.

    python benchmarks/throughput.py                       # batch 50, one full epoch each (60k train + 10k test)
    python benchmarks/throughput.py --batch-size 50 1024 --train-images 20000 --json out.json

Each pipeline trains for one epoch (or --train-images) and then scores the full 10,000-image test set; an
"epoch" figure is train images / (train time + test time). A short warm-up pass runs first and is not timed.

- tutorial: torchvision MNIST with ToTensor per image, a DataLoader, the example's model (separate fc21/fc22,
  sigmoid + BCELoss summed), torch's default Adam.
- harness: exactly what train.py runs: vae.training.train_one_epoch / evaluate_test_set under an Accelerator,
  the uint8 tensor dataset indexed a batch at a time, one Linear for (mu, log sigma^2), logits loss, fused Adam.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.config import Config, DataConfig, TrainConfig  # noqa: E402
from vae.console import EpochBar  # noqa: E402
from vae.data import MNISTTensors, ensure_mnist, load_mnist, make_loader  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.training import evaluate_test_set, make_accelerator, train_one_epoch  # noqa: E402


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


def run_tutorial(root: str, batch_size: int, train_images: int, device: torch.device, z_dim: int) -> dict:
    from torchvision import datasets, transforms

    train_set = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    train_set = torch.utils.data.Subset(train_set, range(train_images))
    test_set = datasets.MNIST(root, train=False, transform=transforms.ToTensor())
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
    return _time(epoch, test, train_images)


def run_harness(root: str, batch_size: int, train_images: int, device: torch.device, z_dim: int) -> dict:
    cfg = Config(train=TrainConfig(batch_size=batch_size, cpu=device.type == "cpu"),
                 data=DataConfig(root=root, eval_batch_size=1000))
    accelerator = make_accelerator(cfg)
    on_device = device.type == "cuda"
    images, labels = load_mnist(root, train=True)
    test_images, test_labels = load_mnist(root, train=False)
    place = (lambda t: t.to(accelerator.device)) if on_device else (lambda t: t)
    train_set = MNISTTensors(place(images[:train_images]), place(labels[:train_images]))
    test_set = MNISTTensors(place(test_images), place(test_labels))
    model = VAE(z_dim=z_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    model, optimizer, scheduler, train_loader, test_loader = accelerator.prepare(
        model, optimizer, scheduler, make_loader(train_set, batch_size, True, 0),
        make_loader(test_set, cfg.data.eval_batch_size, False, 0))
    bar = EpochBar(None, None)

    def epoch():
        train_one_epoch(model, optimizer, scheduler, train_loader, accelerator, bar, epoch=1, step=0,
                        check_every=100)
        _sync(accelerator.device)

    def test():
        evaluate_test_set(model, test_loader, accelerator)
        _sync(accelerator.device)

    epoch(), test()  # warm-up: one full pass (the harness has no cheap partial epoch)
    return _time(epoch, test, train_images)


def _time(epoch, test, train_images: int) -> dict:
    started = time.perf_counter()
    epoch()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    test()
    test_s = time.perf_counter() - started
    return {"train_s": train_s, "test_s": test_s, "train_samples_per_s": train_images / train_s,
            "epoch_samples_per_s": train_images / (train_s + test_s)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[50])
    parser.add_argument("--train-images", type=int, default=60000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    ensure_mnist(args.data_root)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"device: {device} ({machine}); torch {torch.__version__}; {args.train_images} train images + "
          f"10000 test images per epoch")
    results = []
    for batch_size in args.batch_size:
        torch.manual_seed(0)
        tutorial = run_tutorial(args.data_root, batch_size, args.train_images, device, args.z_dim)
        torch.manual_seed(0)
        harness = run_harness(args.data_root, batch_size, args.train_images, device, args.z_dim)
        ratio_train = harness["train_samples_per_s"] / tutorial["train_samples_per_s"]
        ratio_epoch = harness["epoch_samples_per_s"] / tutorial["epoch_samples_per_s"]
        for name, r in (("tutorial", tutorial), ("harness", harness)):
            print(f"batch {batch_size:5d}  {name:8s}  train {r['train_samples_per_s']:10.0f} samples/s  "
                  f"epoch (train+test) {r['epoch_samples_per_s']:10.0f} samples/s  "
                  f"[{r['train_s']:.2f} s train, {r['test_s']:.2f} s test]")
        print(f"batch {batch_size:5d}  harness / tutorial: {ratio_train:.2f}x train, {ratio_epoch:.2f}x epoch")
        results.append({"batch_size": batch_size, "tutorial": tutorial, "harness": harness,
                        "ratio_train": ratio_train, "ratio_epoch": ratio_epoch})
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "machine": machine, "torch": torch.__version__,
                                         "train_images": args.train_images, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
