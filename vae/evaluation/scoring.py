"""The test set, scored: the training loop's test pass after each epoch (`evaluate_test_set`), and evaluate.py's
full evaluation of a checkpoint (`evaluate`: metrics from vae.evaluation.metrics, figures from
vae.figures.model_figures).

Both split the 10,000 images into one contiguous share per process (vae.datasets.batches.share_bounds) and gather the
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

from .. import tracking
from ..cluster.launch import check_backend, check_processes, process_group_handlers
from ..config import Config, config_from_dict
from ..console import RunConsole
from ..datasets import check_dataset_paths, load_dataset
from ..datasets.batches import gather_shares, share_bounds, to_unit_float
from ..errors import HarnessError, first_line
from ..figures.model_figures import model_figures, save_figures
from ..models import VAE, ModelError, build_model
from ..models.objectives import negative_elbo_terms
from ..storage.checkpoint import CheckpointError, atomic_write_text, load_model_file, model_image_shape
from ..storage.files import file_in_the_way
from . import sample_quality as quality
from .metrics import images_per_batch, score_batch, summarize


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
    """The model of a last.pt/best.pt, rebuilt from the file alone (its config's model section and its image
    shape) and checked as train.py checks it (vae.models.conformance), with the file's weights."""
    payload = load_model_file(path)
    try:
        cfg = config_from_dict(payload.get("config"))
    except HarnessError as e:
        raise CheckpointError(f"'{path}' holds a config this harness cannot read ({e})") from None
    try:
        model = build_model(cfg.model, model_image_shape(payload, path))
    except ModelError as e:
        raise CheckpointError(f"'{path}': its model cannot be built here: {e}") from None
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
                    seed: int, dequantize: bool) -> dict[str, torch.Tensor]:
    """Per-image metrics of all test images, in image order, on every process: each process scores its contiguous
    share (vae.datasets.batches.share_bounds) in batches of about batch_size / N, then the shares are gathered."""
    world = accelerator.num_processes
    if world > len(images):
        raise HarnessError(f"{world} processes for {len(images)} test images: start at most {len(images)}")
    lo, hi = share_bounds(len(images), world, accelerator.process_index)
    chunk = max(1, min(batch_size // world, images_per_batch(iwae_k, model.z_dim)))
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        x = to_unit_float(images[start:end].to(accelerator.device))
        scores = score_batch(model, x, torch.arange(start, end), iwae_k=iwae_k, seed=seed, dequantize=dequantize)
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


def _check_options(iwae_k: int, batch_size: int, fcd_samples: int, test_images: int | None) -> None:
    if iwae_k < 1:
        raise HarnessError(f"--iwae-k: must be >= 1 (got {iwae_k})")
    if batch_size < 1:
        raise HarnessError(f"--batch-size: must be >= 1 (got {batch_size})")
    if fcd_samples < 0 or fcd_samples == 1:
        raise HarnessError(f"--fcd-samples: must be 0 (off) or at least 2 (got {fcd_samples})")
    if test_images is not None and test_images < 1:
        raise HarnessError(f"--test-images: must be >= 1 (got {test_images}); leave it out to score them all")


def evaluate(ckpt: str | Path, *, iwae_k: int = 100, seed: int = 0, out: str | Path | None = None,
             out_dir: str | Path | None = None, batch_size: int = 500, cpu: bool = False,
             data_root: str | None = None, figures: bool = True, wandb: bool = False,
             dist_backend: str = "auto", fcd_samples: int = 10_000, test_images: int | None = None) -> dict:
    """Score a checkpoint on all 10,000 test images; main process writes JSON + figures. Returns the metrics.
    wandb: also log them into the W&B run of the checkpoint's run directory (see vae.tracking)."""
    _check_options(iwae_k, batch_size, fcd_samples, test_images)
    started = time.perf_counter()
    path = resolve_checkpoint(ckpt)
    out_dir = Path(out_dir) if out_dir else path.parent / "eval"
    out = Path(out) if out else out_dir / "metrics.json"
    _check_outputs(out, out_dir if figures else None)
    model, cfg, payload = load_model(path)
    # The test set of the dataset the model was trained on, binarized as in training; --data-root moves its root
    data = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=data_root)
    check_dataset_paths(data, root_name="--data-root")
    accelerator = Accelerator(cpu=cpu, log_with=tracking.log_with(wandb),
                              kwargs_handlers=process_group_handlers(dist_backend, None))
    check_processes(accelerator, cpu, "evaluate.py")
    check_backend(accelerator, dist_backend, "--dist-backend")
    console = RunConsole(accelerator.is_main_process)
    dataset = load_dataset(data, console.info, fetching=accelerator.local_main_process_first())
    images, labels = dataset.test_images[:test_images], dataset.test_labels[:test_images]
    model.to(accelerator.device).eval()
    per_image = {key: value.cpu() for key, value in _score_test_set(
        model, images, accelerator, batch_size, iwae_k, seed, dequantize=data.binarize == "none").items()}
    per_image["labels"] = labels
    metrics = summarize(per_image)
    results = {
        **metrics,
        "iwae_k": iwae_k,
        "seed": seed,
        "checkpoint": str(path),
        "checkpoint_epoch": payload.get("epoch"),
        "weights": payload.get("weights", "trained"),  # "ema": the average train.ema_decay kept
        "protocol": likelihood_protocol(data, len(dataset.test_images), metrics, iwae_k, seed),
        "config": _model_record(cfg, data, dataset.image_shape),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "wall_time_s": time.perf_counter() - started,
    }
    drawn = {}
    if accelerator.is_main_process:
        if fcd_samples:
            results.update(sample_quality(model, data, dataset, fcd_samples, seed, accelerator.device, console.info))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1))
        drawn = model_figures(model, images, per_image["mu"], per_image["labels"], accelerator.device,
                              dataset.image_shape, dataset.class_names) if figures else {}
        save_figures(drawn, out_dir)
        _show(console, path, results, cfg.model.z_dim)
        console.info(f"wrote {out}" + (f" and figures in {out_dir}" if figures else ""))
    if wandb:  # its end_training waits for every process, then ends the process group
        _log_to_wandb(accelerator, console, cfg, path, out_dir, results, drawn, per_image)
    else:
        accelerator.wait_for_everyone()
    return results


def _model_record(cfg, data, image_shape) -> dict:
    """What metrics.json says of the model and its data."""
    return {"arch": cfg.model.arch, "z_dim": cfg.model.z_dim, "hidden": list(cfg.model.hidden),
            **({"channels": list(cfg.model.channels)} if cfg.model.arch == "conv" else {}),
            "activation": cfg.model.activation, "image_shape": list(image_shape),
            "data": data.name, "binarize": data.binarize, "run": cfg.run.name}


def _show(console: RunConsole, path: Path, results: dict, z_dim: int) -> None:
    weights = " of the EMA weights" if results["weights"] == "ema" else ""
    console.summary_table(f"{path} (epoch {results['checkpoint_epoch']}{weights}), {results['n_images']} test "
                          f"images, nats per image", {
                              "-ELBO (nelbo)": results["nelbo"], "recon": results["recon"], "kl": results["kl"],
                              f"IWAE NLL (k={results['iwae_k']})": results["iwae_nll"],
                              **({"bits/dim (dequantized)": results["bits_per_dim"]}
                                 if "bits_per_dim" in results else {}),
                              "active units": f"{results['active_units']} / {z_dim}",
                              **({f"FCD ({results['fcd_samples']:,} samples)": results["fcd"]}
                                 if "fcd" in results else {}),
                              "wall time (s)": results["wall_time_s"]})


def _log_to_wandb(accelerator, console, cfg, path: Path, out_dir: Path, results: dict, drawn: dict,
                  per_image: dict) -> None:
    """Into the run directory's W&B run (its id is in <run dir>/wandb_run.json), after its last step. A file
    outside a run directory gets a W&B run of its own, with its files in the evaluation's folder."""
    in_run = tracking.read_run_file(path.parent) is not None
    if not in_run:
        console.info(f"{path.parent} records no W&B run ({tracking.RUN_FILE}): the evaluation is logged as a "
                     f"new W&B run, its files in {out_dir / 'wandb'}")
    only_wandb = dataclasses.replace(cfg.log, wandb=True, trackers=("wandb",))  # whatever the run tracked with
    tracker = tracking.Tracker.start(accelerator, console, log=only_wandb, run_name=cfg.run.name,
                                     run_dir=path.parent if in_run else out_dir, config=None, resumed=in_run)
    tracker.log_evaluation(results, drawn, per_image["mu"], per_image["labels"])
    accelerator.wait_for_everyone()
    tracker.end_training()


def likelihood_protocol(data, all_test_images: int, metrics: dict, iwae_k: int, seed: int) -> dict:
    """What produced the likelihood numbers, for metrics.json: a reader can tell a paper's number from another."""
    scored = metrics["n_images"]
    test_set = f"{data.name} test set, {scored} of {all_test_images} images" if scored < all_test_images else \
        f"{data.name} test set, all {scored} images"
    protocol = {"bound": f"IWAE (Burda et al. 2015), k={iwae_k} samples of q(z|x) per image, noise seeded by "
                         f"(seed {seed}, image index)", "k": iwae_k, "test_images": scored,
                "whole_test_set": scored == all_test_images}
    if data.binarize != "none":
        protocol.update(data=f"{test_set}, binarized once (fixed seed) as data.binarize={data.binarize} trains on",
                        nll_nats=metrics["iwae_nll"],
                        paper_protocol=iwae_k >= 5000 and scored == all_test_images)  # as Burda et al.'s Table 1
    else:
        protocol.update(data=f"{test_set}, 8-bit grey levels", bits_per_dim=metrics["bits_per_dim"],
                        dequantization="uniform: u = (v + U) / 256, U ~ Uniform[0, 1) per pixel; the decoder's logits "
                                       "as a continuous Bernoulli density of u; bits/dim = (IWAE NLL(u) + D ln 256) / "
                                       "(D ln 2), an upper bound on the discrete NLL",
                        iwae_nll_note="iwae_nll scores grey levels under the Bernoulli loss: a loss, no likelihood")
    return protocol


def sample_quality(model, data, dataset, count: int, seed: int, device: torch.device, say) -> dict:
    """The Fréchet classifier distance (vae.evaluation.sample_quality) of `count` samples of the prior, decoded to
    pixel means, against the whole test set in grey levels (binarized or not in training): the dataset's classifier
    is trained on first use and cached under data.root/classifiers/."""
    grey = dataclasses.replace(data, binarize="none")
    reference = dataset if data.binarize == "none" else load_dataset(grey, say)
    key = quality.dataset_key(grey.name, reference.train_images, reference.train_labels)
    classifier, accuracy = quality.classifier_for(
        Path(grey.root) / "classifiers", key, reference.train_images, reference.train_labels,
        reference.test_images, reference.test_labels, reference.image_shape, len(reference.class_names), say=say)
    z = torch.randn(count, model.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        samples = torch.cat([torch.sigmoid(model.decode(chunk.to(device)).float()).cpu() for chunk in z.split(1000)])
    return {"fcd": quality.fcd(classifier.to(device), samples, reference.test_images), "fcd_samples": count,
            "fcd_classifier": {"dataset_key": key, "test_accuracy": accuracy,
                               "weights_sha256": classifier.weights_sha256}}

