"""Evaluate a checkpoint on the full MNIST test set: metrics (vae.metrics) and figures, on any number of processes.

Only the test DataLoader goes through Accelerate (it shards the 10,000 images); the model is not wrapped, as
nothing is trained. gather_for_metrics drops the images Accelerate repeats to even out the last batch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from matplotlib.figure import Figure

from . import plots, tracking
from .checkpoint import CheckpointError, atomic_write_text, load_model_file
from .config import Config, config_from_dict
from .console import RunConsole
from .data import ensure_mnist, gather_shares, load_mnist, share_bounds, to_unit_float
from .errors import HarnessError
from .launch import check_processes
from .metrics import summarize, score_batch
from .model import VAE

RECONSTRUCTION_DIGITS = 10
SAMPLE_GRID = 64
MANIFOLD_SIZE = 20
INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 6, 10
FIGURE_SEED = 1234  # fixed z for the samples figure, so figures of different checkpoints are comparable


def resolve_checkpoint(path: str | Path) -> Path:
    """A .pt file as is; a run directory -> its best.pt, else its last.pt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a .pt file or a run directory "
                              f"(e.g. runs/z2)")
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no checkpoint in directory '{path}' (expected best.pt or last.pt); train first or "
                              f"pass a .pt file")
    return path


def load_model(path: Path) -> tuple[VAE, Config, dict]:
    payload = load_model_file(path)
    try:
        cfg = config_from_dict(payload.get("config"))
    except HarnessError as e:
        raise CheckpointError(f"'{path}' holds a config this harness cannot read ({e})") from None
    model = VAE.from_config(cfg.model)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"'{path}': weights do not fit its model config {cfg.model} ({first})") from None
    return model, cfg, payload


@torch.no_grad()
def model_figures(model: VAE, test_images: torch.Tensor, latents: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> dict[str, Figure]:
    """The figures of a trained model: reconstructions, samples, latent space (+ manifold for z=2),
    interpolations."""
    model.eval()
    originals = to_unit_float(test_images[:RECONSTRUCTION_DIGITS].to(device))
    mu, _ = model.encoder(originals)
    generator = torch.Generator().manual_seed(FIGURE_SEED)
    z = torch.randn(SAMPLE_GRID, model.z_dim, generator=generator).to(device)
    figures = {
        "reconstructions.png": plots.reconstructions(originals, torch.sigmoid(model.decoder(mu))),
        "samples.png": plots.samples(torch.sigmoid(model.decoder(z))),
        "latent.png": plots.latent_scatter(latents, labels),
    }
    if model.z_dim == 2:
        quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, MANIFOLD_SIZE))
        z1, z0 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")  # rows: z[1] high -> low
        grid = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(device)
        figures["manifold.png"] = plots.manifold(torch.sigmoid(model.decoder(grid)), quantiles)
    # Pairs of consecutive test digits with different labels.
    ends = []
    for i in range(len(labels) - 1):
        if labels[i] != labels[i + 1]:
            ends.append((i, i + 1))
        if len(ends) == INTERPOLATION_PAIRS:
            break
    t = torch.linspace(0, 1, INTERPOLATION_STEPS, device=device)[:, None]
    lines = [(1 - t) * latents[a].to(device) + t * latents[b].to(device) for a, b in ends]
    figures["interpolation.png"] = plots.interpolations(torch.sigmoid(model.decoder(torch.cat(lines))), len(ends))
    return figures


def _score_test_set(model: VAE, images: torch.Tensor, accelerator: Accelerator, batch_size: int, iwae_k: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """Per-image metrics of all test images, in image order, on every process: each process scores its contiguous
    share (vae.data.share_bounds) in batches of about batch_size / N, then the shares are gathered."""
    world = accelerator.num_processes
    if world > len(images):
        raise HarnessError(f"{world} processes for {len(images)} test images: start at most {len(images)}")
    lo, hi = share_bounds(len(images), world, accelerator.process_index)
    chunk = max(1, batch_size // world)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        x = to_unit_float(images[start:end].to(accelerator.device))
        scores = score_batch(model, x, torch.arange(start, end), iwae_k=iwae_k, seed=seed)
        for key, value in scores.items():
            parts.setdefault(key, []).append(value)
    return {key: gather_shares(torch.cat(values), len(images), accelerator) for key, values in parts.items()}


def evaluate(ckpt: str | Path, *, iwae_k: int = 100, seed: int = 0, out: str | Path | None = None,
             out_dir: str | Path | None = None, batch_size: int = 500, cpu: bool = False,
             data_root: str | None = None, figures: bool = True, wandb: bool = False) -> dict:
    """Score a checkpoint on all 10,000 test images; main process writes JSON + figures. Returns the metrics.
    wandb: also log them into the W&B run of the checkpoint's run directory (see vae.tracking)."""
    if iwae_k < 1:
        raise HarnessError(f"--iwae-k: must be >= 1 (got {iwae_k})")
    if batch_size < 1:
        raise HarnessError(f"--batch-size: must be >= 1 (got {batch_size})")
    started = time.perf_counter()
    path = resolve_checkpoint(ckpt)
    model, cfg, payload = load_model(path)
    accelerator = Accelerator(cpu=cpu, log_with=tracking.log_with(wandb))
    check_processes(accelerator, cpu, "evaluate.py")
    console = RunConsole(accelerator.is_main_process)
    root = data_root or cfg.data.root
    with accelerator.local_main_process_first():
        ensure_mnist(root, download=cfg.data.download, say=console.info)
    images, labels = load_mnist(root, train=False)
    model.to(accelerator.device).eval()
    per_image = {key: value.cpu() for key, value in _score_test_set(model, images, accelerator, batch_size,
                                                                      iwae_k, seed).items()}
    per_image["labels"] = labels

    metrics = summarize(per_image)
    results = {
        **metrics,
        "iwae_k": iwae_k,
        "seed": seed,
        "checkpoint": str(path),
        "checkpoint_epoch": payload.get("epoch"),
        "config": {"z_dim": cfg.model.z_dim, "hidden": list(cfg.model.hidden), "run": cfg.run.name},
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - started,
    }
    if accelerator.is_main_process:
        out_dir = Path(out_dir) if out_dir else path.parent / "eval"
        out = Path(out) if out else out_dir / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1))
        drawn = model_figures(model, images, per_image["mu"], per_image["labels"], accelerator.device) \
            if figures else {}
        for name, fig in drawn.items():
            plots.save(fig, out_dir / name)
        console.summary_table(f"{path} (epoch {payload.get('epoch')}), {metrics['n_images']} test images, "
                              f"nats per image", {
                                  "-ELBO (nelbo)": metrics["nelbo"], "recon": metrics["recon"], "kl": metrics["kl"],
                                  f"IWAE NLL (k={iwae_k})": metrics["iwae_nll"],
                                  "active units": f"{metrics['active_units']} / {cfg.model.z_dim}",
                                  "wall time (s)": results["wall_time_s"]})
        console.info(f"wrote {out}" + (f" and figures in {out_dir}" if figures else ""))
    if wandb:
        # Into the run directory's W&B run (its id is in <run dir>/wandb_run.json), after its last step.
        tracker = tracking.Tracker.start(accelerator, console, log=dataclasses.replace(cfg.log, wandb=True),
                                         run_name=cfg.run.name, run_dir=path.parent, config=None, resumed=True)
        tracker.log_evaluation(results, drawn if accelerator.is_main_process else {}, per_image["mu"],
                               per_image["labels"])
        accelerator.wait_for_everyone()
        tracker.end_training()
        return results
    accelerator.wait_for_everyone()
    return results
