"""How close a training step comes to the GPU's own work: wall time per step against the kernel time per step
that torch.profiler records, for the eager step and the CUDA-graph step (vae.step), at each batch size.

    python benchmarks/gpu_step_profile.py --batch-size 50 1024 --json out.json

The target for the graph: a step within 2x of its pure kernel time. Needs CUDA; without it, says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.config import load_config  # noqa: E402
from vae.data import EpochBatches, ensure_mnist, load_mnist  # noqa: E402
from vae.launch import make_accelerator  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.step import make_optimizer, make_train_step  # noqa: E402


def _steps(train_step, batches: EpochBatches, count: int) -> None:
    done = 0
    while done < count:
        for indices, size, share in batches.epoch(epoch=done):
            if size != batches.batch_size:
                continue  # the short last batch: not the shape being measured
            train_step(indices, size, share)
            done += 1
            if done == count:
                return


def measure(images: torch.Tensor, batch_size: int, cuda_graph: bool, steps: int) -> dict:
    cfg = load_config(None, ["log.wandb=false", f"train.batch_size={batch_size}",
                             f"train.cuda_graph={str(cuda_graph).lower()}"])
    accelerator = make_accelerator(cfg)
    model = VAE.from_config(cfg.model).to(accelerator.device)
    optimizer = make_optimizer(model.parameters(), cfg.train.lr, accelerator.device, cuda_graph)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = EpochBatches(images, batch_size, seed=0)
    train_step = make_train_step(cuda_graph, model, optimizer, accelerator, images, cfg.model.z_dim,
                                 full_batch=batch_size)
    _steps(train_step, batches, 20)  # warm-up (and the capture)
    torch.cuda.synchronize()
    started = time.perf_counter()
    _steps(train_step, batches, steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    profiled = min(steps, 200)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _steps(train_step, batches, profiled)
        torch.cuda.synchronize()
    kernel_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    # key_averages counts a kernel under each enclosing op too; self time counts each once
    kernel_self_us = sum(e.self_device_time_total for e in prof.key_averages())
    kernel = (kernel_self_us or kernel_us) / profiled / 1e6
    return {"batch_size": batch_size, "cuda_graph": cuda_graph, "wall_us_per_step": wall * 1e6,
            "kernel_us_per_step": kernel * 1e6, "wall_over_kernel": wall / kernel if kernel else None,
            "train_samples_per_s": batch_size / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[50, 1024])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    ensure_mnist(args.data_root, download=False)
    images = load_mnist(args.data_root, train=True)[0].cuda()
    rows = [measure(images, b, graph, args.steps) for b in args.batch_size for graph in (False, True)]
    print(f"{'batch':>6} {'path':>10} {'wall us/step':>13} {'kernel us/step':>15} {'wall/kernel':>12} "
          f"{'samples/s':>12}   ({torch.cuda.get_device_name()})")
    for r in rows:
        print(f"{r['batch_size']:>6} {'graph' if r['cuda_graph'] else 'eager':>10} {r['wall_us_per_step']:>13.1f} "
              f"{r['kernel_us_per_step']:>15.1f} {r['wall_over_kernel']:>12.2f} {r['train_samples_per_s']:>12,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
