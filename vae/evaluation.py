"""The test set, scored: the training loop's test pass after each epoch (`evaluate_test_set`), and evaluate.py's
full evaluation of a checkpoint (`evaluate`: metrics from vae.metrics, figures from vae.figures).

Both split the 10,000 images into one contiguous share per process (vae.data.share_bounds) and gather the
per-image numbers in image order, so 1 or N processes give the same numbers; the model is not wrapped, as nothing
is trained here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from . import tracking
from .checkpoint import CheckpointError, atomic_write_text, load_model_file
from .config import Config, config_from_dict
from .console import RunConsole
from .data import check_data_root, ensure_mnist, gather_shares, load_mnist, share_bounds, to_unit_float
from .errors import HarnessError, first_line
from .figures import model_figures, save_figures
from .files import file_in_the_way
from .launch import check_backend, check_processes, process_group_handlers
from .metrics import score_batch, summarize
from .model import VAE, negative_elbo_terms


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
        raise CheckpointError(f"'{path}': weights do not fit its model config {cfg.model} ({first_line(e)})") from None
    return model, cfg, payload


@torch.no_grad()
def evaluate_test_set(model, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
                      accelerator: Accelerator, batch_size: int) -> dict:
    """-ELBO, reconstruction and KL over exactly the whole test set. Each process scores its contiguous share of
    the images, in batches of about batch_size / N, with the noise `noise[i]` for image i (the same for any number
    of processes and any device), and the per-image numbers are gathered in image order."""
    model.eval()
    lo, hi = share_bounds(len(images), accelerator.num_processes, accelerator.process_index)
    chunk = max(1, batch_size // accelerator.num_processes)
    rows = [torch.zeros(0, 2 + noise.shape[1], device=accelerator.device)]
    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        x = to_unit_float(images[start:end].to(accelerator.device))
        with accelerator.autocast():
            logits, mu, logvar = model(x, noise[start:end])
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
        rows.append(torch.cat((recon[:, None], kl[:, None], mu.float()), dim=1))
    scores = gather_shares(torch.cat(rows), len(images), accelerator)
    recon, kl = scores[:, 0], scores[:, 1]
    return {
        "val/loss": (recon + kl).mean().item(),
        "val/recon": recon.mean().item(),
        "val/kl": kl.mean().item(),
        "n_images": len(recon),
        "latent_means": scores[:, 2:],
        "labels": labels,
    }


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


def _check_outputs(out: Path, out_dir: Path | None) -> None:
    """Before the scoring (minutes at a large --iwae-k): where the results go can take them."""
    if out.is_dir():
        raise HarnessError(f"--out {out} is a folder; pass a file name, e.g. --out {out / 'metrics.json'}")
    for name, folder in (("--out", out.parent), ("--out-dir", out_dir)):
        if folder is not None and (blocker := file_in_the_way(folder)) is not None:
            raise HarnessError(f"{name} {folder if name == '--out-dir' else out}: {blocker} is a file, not a "
                               f"folder; pass a path in a folder")


def evaluate(ckpt: str | Path, *, iwae_k: int = 100, seed: int = 0, out: str | Path | None = None,
             out_dir: str | Path | None = None, batch_size: int = 500, cpu: bool = False,
             data_root: str | None = None, figures: bool = True, wandb: bool = False,
             dist_backend: str = "auto") -> dict:
    """Score a checkpoint on all 10,000 test images; main process writes JSON + figures. Returns the metrics.
    wandb: also log them into the W&B run of the checkpoint's run directory (see vae.tracking)."""
    if iwae_k < 1:
        raise HarnessError(f"--iwae-k: must be >= 1 (got {iwae_k})")
    if batch_size < 1:
        raise HarnessError(f"--batch-size: must be >= 1 (got {batch_size})")
    started = time.perf_counter()
    path = resolve_checkpoint(ckpt)
    out_dir = Path(out_dir) if out_dir else path.parent / "eval"
    out = Path(out) if out else out_dir / "metrics.json"
    _check_outputs(out, out_dir if figures else None)
    model, cfg, payload = load_model(path)
    if data_root is not None:
        check_data_root(data_root, "--data-root")
    accelerator = Accelerator(cpu=cpu, log_with=tracking.log_with(wandb),
                              kwargs_handlers=process_group_handlers(dist_backend, None))
    check_processes(accelerator, cpu, "evaluate.py")
    check_backend(accelerator, dist_backend, "--dist-backend")
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
        "weights": payload.get("weights", "trained"),  # "ema": the average train.ema_decay kept
        "config": {"z_dim": cfg.model.z_dim, "hidden": list(cfg.model.hidden), "run": cfg.run.name},
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - started,
    }
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1))
        drawn = model_figures(model, images, per_image["mu"], per_image["labels"], accelerator.device) \
            if figures else {}
        save_figures(drawn, out_dir)
        weights = " of the EMA weights" if results["weights"] == "ema" else ""
        console.summary_table(f"{path} (epoch {payload.get('epoch')}{weights}), {metrics['n_images']} test "
                              f"images, nats per image", {
                                  "-ELBO (nelbo)": metrics["nelbo"], "recon": metrics["recon"], "kl": metrics["kl"],
                                  f"IWAE NLL (k={iwae_k})": metrics["iwae_nll"],
                                  "active units": f"{metrics['active_units']} / {cfg.model.z_dim}",
                                  "wall time (s)": results["wall_time_s"]})
        console.info(f"wrote {out}" + (f" and figures in {out_dir}" if figures else ""))
    if wandb:
        # Into the run directory's W&B run (its id is in <run dir>/wandb_run.json), after its last step. A file
        # outside a run directory gets a W&B run of its own, with its files in the evaluation's folder.
        in_run = tracking.read_run_file(path.parent) is not None
        if not in_run:
            console.info(f"{path.parent} records no W&B run ({tracking.RUN_FILE}): the evaluation is logged as a "
                         f"new W&B run, its files in {out_dir / 'wandb'}")
        only_wandb = dataclasses.replace(cfg.log, wandb=True, trackers=("wandb",))  # whatever the run tracked with
        tracker = tracking.Tracker.start(accelerator, console, log=only_wandb,
                                         run_name=cfg.run.name, run_dir=path.parent if in_run else out_dir,
                                         config=None, resumed=in_run)
        tracker.log_evaluation(results, drawn if accelerator.is_main_process else {}, per_image["mu"],
                               per_image["labels"])
        accelerator.wait_for_everyone()
        tracker.end_training()
        return results
    accelerator.wait_for_everyone()
    return results
