"""How close a training step comes to the GPU's own work: wall time per step against the kernel time per step
that torch.profiler records, for the eager step, the CUDA-graph step (vae.training.step), each with torch.compile,
at each batch size; with the device operations per step, the costliest kernels, and what one tiny kernel costs on this
machine eagerly and inside a graph (which of launching or the kernels bounds a step).

    python benchmarks/gpu_step_profile.py --batch-size 50 1024 --variants eager graph --json out.json

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

from vae.cluster.launch import make_accelerator  # noqa: E402
from vae.config import load_config  # noqa: E402
from vae.datasets.batches import EpochBatches  # noqa: E402
from vae.datasets.mnist import ensure_mnist, load_mnist  # noqa: E402
from vae.errors import first_line  # noqa: E402
from vae.models import build_model  # noqa: E402
from vae.training.step import make_train_step, prepare_optimization  # noqa: E402


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


# name: (CUDA graph, torch.compile). "compiled + graph" is not a train.py setting (train.cuda_graph and
# train.compile are exclusive there): it is measured to show what the two together would give. "graph, fused Adam"
# is the graph step with torch's fused capturable Adam in place of vae.training.optim.FlatAdam (what the graph used
# before).
VARIANTS = {"eager": (False, False), "graph": (True, False), "compiled": (False, True),
            "compiled + graph": (True, True), "graph, fused Adam": (True, False)}


def _build(images: torch.Tensor, batch_size: int, variant: str):
    cuda_graph, compiled = VARIANTS[variant]
    cfg = load_config(None, ["log.wandb=false", f"train.batch_size={batch_size}",
                             f"train.cuda_graph={str(cuda_graph).lower()}"])
    accelerator = make_accelerator(cfg)
    raw_model = build_model(cfg.model, (1, 28, 28)).to(accelerator.device)
    if variant == "graph, fused Adam":
        adam = torch.optim.Adam(raw_model.parameters(), lr=torch.tensor(cfg.train.lr, device=accelerator.device),
                                fused=True, capturable=True)
        model, optimizer = accelerator.prepare(raw_model, adam)
    else:
        model, optimizer, _ = prepare_optimization(raw_model, cfg.train, accelerator, steps_per_epoch=1,
                                                   cuda_graph=cuda_graph)
    if compiled:
        model = torch.compile(model)
    return make_train_step(cuda_graph, model, optimizer, accelerator, images, cfg.model.z_dim,
                           full_batch=batch_size)


def _kernel_table(prof, steps: int) -> tuple[float, float, list[dict]]:
    """Device time per step, device operations (kernels, copies, sets) per step, and the 8 costliest (a kernel
    name keeps its template arguments: which functor a multi-tensor kernel runs is in them)."""
    device_ops = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    # key_averages counts a kernel under each enclosing op too; self time counts each once
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) or \
        sum(e.device_time_total for e in device_ops)
    top = sorted(device_ops, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return (kernel_us / steps, sum(e.count for e in device_ops) / steps,
            [{"name": e.key[:200], "us_per_step": e.self_device_time_total / steps, "per_step": e.count / steps}
             for e in top])


def measure(images: torch.Tensor, batch_size: int, variant: str, steps: int) -> dict:
    cuda_graph, compiled = VARIANTS[variant]
    train_step = _build(images, batch_size, variant)
    batches = EpochBatches(images, batch_size, seed=0)
    started = time.perf_counter()
    _steps(train_step, batches, 20)  # warm-up (the compilation, the capture)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    _steps(train_step, batches, steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - started) / steps
    profiled = min(steps, 200)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _steps(train_step, batches, profiled)
        torch.cuda.synchronize()
    kernel_us, ops_per_step, top = _kernel_table(prof, profiled)
    return {"batch_size": batch_size, "variant": variant, "cuda_graph": cuda_graph, "compiled": compiled,
            "warmup_s": warmup_s, "wall_us_per_step": wall * 1e6, "kernel_us_per_step": kernel_us,
            "wall_over_kernel": wall * 1e6 / kernel_us if kernel_us else None,
            "device_ops_per_step": ops_per_step, "train_samples_per_s": batch_size / wall, "top_kernels": top}


def launch_costs(count: int = 2000) -> dict:
    """What one tiny kernel costs on this machine: launched eagerly from Python (host-bound: dispatch and the
    driver's launch), and replayed inside a CUDA graph (device-bound: the kernel and the gap to the next)."""
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - started) / count * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(200):
            x.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count // 200):
        graph.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - started) / (count // 200 * 200) * 1e6
    return {"eager_us_per_tiny_kernel": eager_us, "graph_us_per_tiny_kernel": graph_us}


def _header() -> str:
    return (f"{'batch':>6} {'path':>17} {'wall us/step':>13} {'kernel us/step':>15} {'wall/kernel':>12} "
            f"{'ops/step':>9} {'samples/s':>12}   ({torch.cuda.get_device_name()})")


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['batch_size']:>6} {r['variant']:>17}   failed: {r['error']}"
    ratio = f"{r['wall_over_kernel']:.2f}" if r["wall_over_kernel"] else "n/a"
    return (f"{r['batch_size']:>6} {r['variant']:>17} {r['wall_us_per_step']:>13.1f} {r['kernel_us_per_step']:>15.1f} "
            f"{ratio:>12} {r['device_ops_per_step']:>9.1f} {r['train_samples_per_s']:>12,.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[50, 1024])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    ensure_mnist(args.data_root, download=False)
    images = load_mnist(args.data_root, train=True)[0].cuda()
    report = {"gpu": torch.cuda.get_device_name(), "launch": launch_costs(), "rows": []}
    print(f"one tiny kernel: {report['launch']['eager_us_per_tiny_kernel']:.1f} us launched eagerly, "
          f"{report['launch']['graph_us_per_tiny_kernel']:.2f} us inside a CUDA graph\n{_header()}", flush=True)
    for batch_size in args.batch_size:
        for variant in args.variants:
            try:
                row = measure(images, batch_size, variant, args.steps)
            except Exception as error:  # a variant that does not run is a finding, not the end of the profile
                row = {"batch_size": batch_size, "variant": variant, "error": first_line(error)}
            report["rows"].append(row)
            print(_row_line(row), flush=True)
            if args.json:  # after each row: a run stopped part-way keeps what it measured
                Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
