"""What each speed choice of the harness gives: time per optimisation step of the z=2 model at batch 50 with one
choice changed at a time (the data comes from the uint8 tensors, as in the harness).

    python benchmarks/step_ablation.py [--steps 600] [--compile]

Rows: the harness's choices (fused Adam, one Linear for mu and log sigma^2, torch's default threads), then
Adam's for-loop and foreach implementations, two separate heads as in the tutorial, 1 thread, and (with
--compile) torch.compile of the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.datasets.batches import to_unit_float  # noqa: E402
from vae.datasets.mnist import ensure_mnist, load_mnist  # noqa: E402
from vae.models import MLPVAE as VAE  # noqa: E402
from vae.models import reparameterize  # noqa: E402
from vae.models.objectives import negative_elbo_terms  # noqa: E402


class TwoHeadVAE(VAE):
    """The harness's VAE with the tutorial's separate fc21/fc22 heads."""

    def __init__(self, z_dim: int = 2):
        super().__init__(z_dim=z_dim)
        self.mu_head = nn.Linear(400, z_dim)
        self.logvar_head = nn.Linear(400, z_dim)
        del self.encoder.head

    def forward(self, x):
        h = self.encoder.body(x)
        mu, logvar = self.mu_head(h), self.logvar_head(h)
        return self.decoder(reparameterize(mu, logvar)), mu, logvar


def time_steps(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, steps: int) -> float:
    batches = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(50)

    def step(i: int) -> None:
        x = to_unit_float(images[batches[i % len(batches)]])
        logits, mu, logvar = model(x)
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
        optimizer.zero_grad(set_to_none=True)
        (recon + kl).sum().backward()
        optimizer.step()

    for i in range(50):  # warm-up (and compilation, where asked)
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args()
    ensure_mnist(args.data_root)
    images, _ = load_mnist(args.data_root, train=True)
    default_threads = torch.get_num_threads()

    def variant(name, make_model=VAE, adam=None, threads=default_threads, compile_model=False):
        adam = adam or {"fused": True}
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **adam)
        timed = torch.compile(model) if compile_model else model
        seconds = time_steps(timed, optimizer, images, args.steps)
        torch.set_num_threads(default_threads)
        return name, seconds

    rows = [
        variant(f"harness: fused Adam, one head, {default_threads} threads"),
        variant("Adam for-loop (foreach=False)", adam={"foreach": False}),
        variant("Adam foreach", adam={"foreach": True}),
        variant("two heads (tutorial's fc21/fc22)", make_model=TwoHeadVAE),
        variant("1 thread", threads=1),
    ]
    if args.compile:
        rows.append(variant("torch.compile(model)", compile_model=True))
    base = rows[0][1]
    print(f"torch {torch.__version__}, batch 50, z=2, {args.steps} timed steps")
    for name, seconds in rows:
        print(f"{name:45s} {seconds * 1e3:7.2f} ms/step  {50 / seconds:8.0f} samples/s  {base / seconds:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
