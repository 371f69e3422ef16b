"""The training loop, top to bottom: launch checks, data, model, resume, then per epoch train -> test -> checkpoint,
then figures. Every process runs this code; only the main process prints and writes files.

Accelerate wraps the model, optimizer, scheduler and both DataLoaders, so the same code runs on a CPU, one GPU,
several GPUs or nodes (DDP/NCCL) and several CPU processes (DDP/gloo). `train.batch_size` is the GLOBAL batch:
each process trains its share of every batch (vae.data.EpochBatches) with the noise it would get alone
(vae.step), so 1 or N processes train the same model from the same config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from . import checkpoint, plots, tracking
from .config import Config, config_to_dict, dump_yaml
from .console import RunConsole
from .data import EpochBatches, ensure_mnist, gather_shares, load_mnist, share_bounds, to_unit_float
from .evaluation import model_figures
from .launch import check_training_launch, environment_info, make_accelerator
from .resume import (batch_order_settings, check_mid_epoch_resume, check_resumable, follow_config_lr,
                     resume_full_state)
from .run_dir import full_state_bytes, disk_full_error, prepare_run_dir, read_metrics, room_or_fail, space_needed
from .errors import TrainingError, first_line
from .model import VAE, negative_elbo_terms
from .step import TrainStep, make_optimizer, make_train_step, restore_step_settings
from .preemption import EXIT_CODES, StopRequest, requeue_slurm_job, slurm_job_id


# ---------------------------------------------------------------------------------------------------------
# Setup


def _data_on_device(cfg: Config, accelerator: Accelerator) -> bool:
    return cfg.data.on_device if cfg.data.on_device is not None else accelerator.device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# Run directory and resume


# ---------------------------------------------------------------------------------------------------------
# One epoch of training, one pass over the test set


STOP_POLL_STEPS = 10  # with several processes, how often they agree on whether a stop was requested


def train_one_epoch(train_step: TrainStep, batches: EpochBatches, scheduler, accelerator: Accelerator, bar, *,
                    epoch: int, step: int, check_every: int, stop: StopRequest | None = None,
                    skip_batches: int = 0, partial: dict | None = None, tracker: tracking.Tracker | None = None,
                    nonfinite: NonFiniteSteps | None = None) -> dict:
    """One pass over the training batches (the first `skip_batches` skipped, when resuming mid-epoch).
    Returns the epoch's mean loss, or, if a stop was requested, where it stopped ("interrupted": True).
    Every `check_every` steps: the finiteness check, the progress bar's loss and the train/* metrics; between two
    checks nothing is read back from the device."""
    train_step.model.train()
    # A mid-epoch checkpoint holds the sums of all processes together: the main process carries them on.
    partial = partial if partial and accelerator.is_main_process else {}
    loss_sum = float(partial.get("loss_sum", 0.0))
    seen = started_seen = int(partial.get("seen", 0))
    sums = train_step.sums.zero_()  # recon, KL over this rank's images since the epoch (re)started
    reported, reported_seen, reported_at = sums.clone(), seen, time.perf_counter()
    batches_done = skip_batches
    bar.advance(skip_batches)
    interrupted = False
    skipped_before = nonfinite.skipped if nonfinite is not None else 0
    attempted, updates_before = 0, applied_updates(train_step.optimizer)
    for indices, global_size, share in batches.epoch(epoch, start=skip_batches):
        if train_step(indices, global_size, share):
            seen += len(indices)
            attempted += 1
        elif nonfinite is not None:
            nonfinite.skip(epoch, step + 1)
        scheduler.step()  # the schedule follows batches, applied or skipped
        step += 1
        batches_done += 1
        bar.advance()
        if step % check_every == 0:
            # One all-reduce: every rank reaches the same verdict (none waits alone), and the numbers reported
            # are per image over all processes' images since the last report.
            window = torch.cat((sums - reported, sums.new_tensor([seen - reported_seen])))
            recon_sum, kl_sum, images_seen = accelerator.reduce(window, reduction="sum").tolist()
            if images_seen:  # 0 only when every step since the last report was skipped (train.skip_nonfinite)
                now = time.perf_counter()
                current = (recon_sum + kl_sum) / images_seen
                _stop_if_not_finite(current, epoch, step)
                bar.show_loss(current)
                if tracker is not None:
                    tracker.log({"train/loss": current, "train/recon": recon_sum / images_seen,
                                 "train/kl": kl_sum / images_seen, "train/lr": current_lr(scheduler),
                                 "train/samples_per_s": images_seen / max(now - reported_at, 1e-9)}, step=step)
                reported, reported_seen, reported_at = sums.clone(), seen, now
        if stop is not None and _stop_agreed(stop, accelerator, step):
            interrupted = True
            break
    loss_sum += sums.sum().item()
    if interrupted:
        loss_sum, seen = accelerator.reduce(torch.tensor([loss_sum, float(seen)], dtype=torch.float64,
                                                         device=accelerator.device), reduction="sum").tolist()
        return {"interrupted": True, "step": step, "batches_done": batches_done, "loss_sum": loss_sum,
                "seen": int(seen)}
    # loss sum, images of the whole epoch, images trained by this start (fewer when resumed mid-epoch)
    totals = accelerator.reduce(torch.tensor([loss_sum, float(seen), float(seen - started_seen)],
                                             dtype=torch.float64, device=accelerator.device), reduction="sum")
    # per process, the images it trained in this epoch since this start (a resumed epoch's earlier images are
    # carried as one total)
    per_rank = accelerator.gather(torch.tensor([seen - started_seen], device=accelerator.device)).tolist()
    mean_loss = (totals[0] / totals[1]).item()
    _stop_if_not_finite(mean_loss, epoch, step)
    # fp16's loss scaler skips the update of a step whose gradients overflowed (fused Adam then leaves its step
    # count alone): those count as skipped too.
    scaler_skipped = attempted - (applied_updates(train_step.optimizer) - updates_before)
    return {"interrupted": False, "train/loss": mean_loss, "samples": int(totals[1].item()),
            "samples_trained_now": int(totals[2].item()), "samples_per_rank": per_rank, "step": step,
            "skipped": scaler_skipped + ((nonfinite.skipped - skipped_before) if nonfinite is not None else 0)}


def applied_updates(optimizer) -> int:
    """How many updates Adam has applied (its step count; one sync when it lives on the device)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    for state in inner.state.values():
        return int(state["step"]) if "step" in state else 0
    return 0


def current_lr(scheduler) -> float:
    lr = scheduler.get_last_lr()[0]
    return float(lr)  # a device tensor under train.cuda_graph


def _stop_agreed(stop: StopRequest, accelerator: Accelerator, step: int, every_step: bool = False) -> bool:
    """True on every process once any of them was asked to stop (checked every STOP_POLL_STEPS steps)."""
    if accelerator.num_processes == 1:
        return stop.requested
    if step % STOP_POLL_STEPS and not every_step:
        return False
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


class NonFiniteSteps:
    """train.skip_nonfinite: how many training steps with a non-finite loss this start may skip (their update is
    not applied) before it stops. 0, the default, stops at the first periodic check that sees one."""

    def __init__(self, limit: int, console: RunConsole):
        self.limit, self.skipped, self.console = limit, 0, console

    def skip(self, epoch: int, step: int) -> None:
        self.skipped += 1
        if self.skipped > self.limit:
            raise TrainingError(f"training loss was not finite at epoch {epoch}, step {step}, more than "
                                f"train.skip_nonfinite={self.limit} times; the last good checkpoint is kept. Lower "
                                f"train.lr (or check the data) and re-run to resume from it")
        self.console.warn(f"training loss not finite at epoch {epoch}, step {step}: update skipped "
                          f"({self.skipped} of at most {self.limit}, train.skip_nonfinite)")


def _stop_if_not_finite(value: float, epoch: int, step: int) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise TrainingError(f"training loss became {value} at epoch {epoch}, step {step}; the last good checkpoint "
                            f"is kept. Lower train.lr (or check the data) and re-run to resume from it")


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and figures


def save_full_state(accelerator: Accelerator, run_dir: Path, trainer_state: dict, keep: int,
                    state_bytes: int) -> Path:
    """Every rank calls this. trainer_state says where to go on: epoch, batches_done in it, step, best, and the
    partial epoch's loss sums when stopped mid-epoch. state_bytes: about how much a state takes (to tell a full
    disk from other failures)."""
    step = trainer_state["step"]
    partial = checkpoint.partial_state_dir(run_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(partial))  # every rank writes its own RNG state
    except Exception as error:  # e.g. the disk filled up
        failure = error
    # Every rank learns whether any failed (no rank left waiting for one that gave up), and why.
    reasons = gather_object([first_line(failure) if failure is not None else None])
    if any(reasons):
        if accelerator.is_main_process:  # give the space back; the older states stay as they were
            shutil.rmtree(partial, ignore_errors=True)
        if failure is not None:
            disk_full = checkpoint.as_disk_full(failure, partial, state_bytes)
            if disk_full is None or disk_full is failure:
                raise failure  # a full disk (train() says so in one line), or a bug whose traceback a report needs
            raise disk_full from failure
        raise TrainingError(f"could not save the checkpoint of step {step}: " + "; ".join(
            f"process rank {rank}: {reason}" for rank, reason in enumerate(reasons) if reason))
    if accelerator.is_main_process:
        checkpoint.follow_umask(partial)
        checkpoint.commit_state(run_dir, step, trainer_state)
        checkpoint.prune_states(run_dir, keep)
    accelerator.wait_for_everyone()
    return checkpoint.state_dir(run_dir, step)


def _stop_after_checkpoint(stop: StopRequest, accelerator: Accelerator, console: RunConsole, saved: Path,
                           epoch: int, batches_done: int, steps_per_epoch: int) -> None:
    """After the checkpoint of a requested stop: requeue under Slurm (SIGUSR1), then leave with a message."""
    where = f"epoch {epoch}, batch {batches_done}/{steps_per_epoch}" if batches_done else f"the start of epoch {epoch}"
    message = f"stopped by {stop.signal_name} at {where}; saved {saved}"
    job = slurm_job_id()
    if stop.signal_name == "SIGUSR1" and job:
        if accelerator.is_main_process:
            message += "; " + requeue_slurm_job(job)
    elif job:  # SIGTERM from Slurm: scancel, preemption, a time limit, or its own requeue
        message += "; if Slurm requeues the job it resumes from here, else submit the same command again"
    else:
        message += "; run the same command again to resume"
    accelerator.wait_for_everyone()
    error = TrainingError(message)
    error.exit_code = EXIT_CODES.get(stop.signal_name, 1)
    raise error


def write_figures(model: VAE, history: list[dict], test_images: torch.Tensor, evaluation: dict, out_dir: Path,
                  device: torch.device) -> list[Path]:
    figures = {"loss.png": plots.loss_curve(history),
               **model_figures(model, test_images, evaluation["latent_means"], evaluation["labels"], device)}
    return [plots.save(fig, out_dir / name) for name, fig in figures.items()]


def track_epoch(tracker: tracking.Tracker, cfg: Config, model: VAE, row: dict, evaluation: dict,
                test_images: torch.Tensor, device: torch.device, improved: bool) -> None:
    """The epoch in W&B (main process): val/* against `epoch`; every log.images_every_epochs epochs the figures
    (fixed test digits, fixed z) and the latent table; the model file as an artifact when asked."""
    epoch, step = row["epoch"], row["step"]
    tracker.log({"epoch": epoch, "train/epoch_loss": row["train/loss"], "val/loss": row["val/loss"],
                 "val/recon": row["val/recon"], "val/kl": row["val/kl"]}, step=step)
    if tracker.figures_due(cfg.log.images_every_epochs, epoch, cfg.train.epochs):
        figures = model_figures(model, test_images, evaluation["latent_means"], evaluation["labels"], device)
        tracker.log_figures(figures, evaluation["latent_means"], evaluation["labels"], epoch, step)
    if cfg.log.checkpoint_artifacts:
        tracker.log_model_file(cfg.run_dir / "last.pt", epoch=epoch, best=improved,
                               metrics={k: v for k, v in row.items() if isinstance(v, (int, float))})


def _param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------------------
# The whole run


def train(cfg: Config) -> dict:
    """Train (or resume) the run described by `cfg`; returns the final metrics."""
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(cfg, cleanup)
    except OSError as error:  # any write, checkpoint or figure, that found the disk full
        disk_full = disk_full_error(error, cfg.run_dir)
        if disk_full is not None:
            raise disk_full from None
        raise


@dataclasses.dataclass
class TrainingData:
    train_images: torch.Tensor  # uint8 [N, 784], on the data's device
    test_images: torch.Tensor  # uint8 [10000, 784], on the CPU (for the figures)
    test_images_here: torch.Tensor  # the same, on the data's device
    test_labels: torch.Tensor
    test_noise: torch.Tensor  # one N(0, I) draw per test image, on the model's device
    batches: EpochBatches


def _load_data(cfg: Config, accelerator: Accelerator, console: RunConsole) -> TrainingData:
    # The node's first process fetches and verifies; the others then only verify.
    with accelerator.local_main_process_first():
        ensure_mnist(cfg.data.root, download=cfg.data.download, say=console.info)
    train_images = load_mnist(cfg.data.root, train=True)[0][: cfg.data.train_subset]
    test_images, test_labels = load_mnist(cfg.data.root, train=False)
    data_device = accelerator.device if _data_on_device(cfg, accelerator) else torch.device("cpu")
    train_images = train_images.to(data_device)
    # The test pass's noise: one fixed draw per image, so val/loss moves only with the model, and is the same
    # on any device and any number of processes.
    test_noise = torch.randn(len(test_images), cfg.model.z_dim,
                             generator=torch.Generator().manual_seed(cfg.train.seed)).to(accelerator.device)
    batches = EpochBatches(train_images, cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                           accelerator.num_processes)
    return TrainingData(train_images, test_images, test_images.to(data_device), test_labels, test_noise, batches)


def _train(cfg: Config, cleanup: contextlib.ExitStack) -> dict:
    started = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    accelerator = make_accelerator(cfg)
    console = RunConsole(accelerator.is_main_process)
    check_training_launch(cfg, accelerator, console)
    main = accelerator.is_main_process
    # The run directory: this training's alone (a second one there stops here), resumed or started afresh.
    run_dir = cfg.run_dir
    resume, lock = prepare_run_dir(cfg, accelerator, console)
    if lock is not None:
        cleanup.callback(lock.release)
    if resume:
        check_resumable(run_dir, cfg)

    data = _load_data(cfg, accelerator, console)
    train_images, test_images, batches = data.train_images, data.test_images, data.batches

    # Model and optimisation. Every rank is seeded alike and stays alike: the training noise of a global batch
    # is drawn whole on every rank (vae.step), so 1 or N processes train the same model.
    set_seed(cfg.train.seed)
    model = VAE.from_config(cfg.model).to(accelerator.device)
    optimizer = make_optimizer(model.parameters(), cfg.train.lr, accelerator.device, cfg.train.cuda_graph)
    steps_per_epoch = len(batches)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raw_model = model
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if cfg.train.compile:  # after prepare: the saved states keep the module's own parameter names
        model = torch.compile(model)
    train_step = make_train_step(cfg.train.cuda_graph, model, optimizer, accelerator, train_images,
                                 cfg.model.z_dim, full_batch=cfg.train.batch_size,
                                 guard_nonfinite=cfg.train.skip_nonfinite > 0)

    state_bytes = full_state_bytes(raw_model)
    if main:
        room_or_fail(run_dir, space_needed(raw_model, cfg))
    accelerator.wait_for_everyone()
    start_epoch, step, skip_batches, partial = 1, 0, 0, {}
    best = {"val/loss": float("inf"), "epoch": None}
    if resume:
        resumed = resume_full_state(accelerator, run_dir, console)
        restore_step_settings(optimizer, accelerator.device, cfg.train.cuda_graph)
        check_mid_epoch_resume(cfg, resumed)
        follow_config_lr(optimizer, scheduler, cfg, total_steps,
                          (resumed["epoch"] - 1) * steps_per_epoch + resumed["batches_done"], console)
        start_epoch, step, skip_batches, best = (resumed["epoch"], resumed["step"], resumed["batches_done"],
                                                 resumed["best"])
        partial = resumed.get("partial", {})
    history = read_metrics(run_dir / "metrics.jsonl", up_to_epoch=start_epoch - 1)

    def test_pass() -> dict:
        # the plain module: no DDP (no gradients here), no compiled graph to trace again for another shape
        return evaluate_test_set(raw_model, data.test_images_here, data.test_labels, data.test_noise, accelerator,
                                 cfg.data.eval_batch_size)

    config_dict = config_to_dict(cfg)
    nonfinite = NonFiniteSteps(cfg.train.skip_nonfinite, console)
    stop = StopRequest().install()  # from here on, SIGTERM/SIGUSR1/Ctrl-C stop at a checkpoint
    if main:
        checkpoint.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
        checkpoint.atomic_write_text(run_dir / "environment.json", json.dumps(environment_info(accelerator),
                                                                               indent=1))
        # Epochs after the resumed state were lost with the crash; they are about to be trained again.
        checkpoint.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        console.info(f"run directory {run_dir} | {accelerator.num_processes} process(es) on {accelerator.device} "
                     f"({accelerator.distributed_type}) | mixed precision {accelerator.mixed_precision} | "
                     f"global batch {cfg.train.batch_size} | {len(train_images)} train / {len(test_images)} test images"
                     + (" | CUDA graph" if cfg.train.cuda_graph else ""))
    tracker = tracking.Tracker.start(accelerator, console, log=cfg.log, run_name=cfg.run.name, run_dir=run_dir,
                                     config=config_dict, resumed=resume)
    tracker.define_epoch_metrics()

    try:
        evaluation = None
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            epoch_started = time.perf_counter()
            with console.epoch_progress(epoch, cfg.train.epochs, steps_per_epoch) as bar:
                trained = train_one_epoch(train_step, batches, scheduler, accelerator, bar, epoch=epoch,
                                          step=step, check_every=cfg.log.every_steps, stop=stop,
                                          skip_batches=skip_batches, partial=partial, tracker=tracker,
                                          nonfinite=nonfinite)
            skip_batches, partial = 0, {}
            step = trained["step"]
            if trained["interrupted"]:
                saved = save_full_state(accelerator, run_dir, {
                    "epoch": epoch, "batches_done": trained["batches_done"], "step": step, "best": best,
                    "partial": {"loss_sum": trained["loss_sum"], "seen": trained["seen"],
                                "batch_order": batch_order_settings(cfg)}},
                    cfg.train.keep_checkpoints, state_bytes)
                _stop_after_checkpoint(stop, accelerator, console, saved, epoch, trained["batches_done"],
                                       steps_per_epoch)
            train_time = time.perf_counter() - epoch_started
            evaluation = test_pass()
            row = {
                "epoch": epoch,
                "step": step,
                "train/loss": trained["train/loss"],
                "val/loss": evaluation["val/loss"],
                "val/recon": evaluation["val/recon"],
                "val/kl": evaluation["val/kl"],
                "samples_per_s": trained["samples_trained_now"] / train_time,
                "epoch_time_s": time.perf_counter() - epoch_started,
                "lr": current_lr(scheduler),
                "samples_per_rank": trained["samples_per_rank"],
                "skipped_steps": trained["skipped"],
                "val/n_images": evaluation["n_images"],
            }
            history.append(row)
            improved = row["val/loss"] < best["val/loss"]
            if improved:
                best = {"val/loss": row["val/loss"], "epoch": epoch}
            if main:
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                console.epoch_line(row)
                metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                checkpoint.save_model_file(run_dir / "last.pt", raw_model, config_dict, epoch, metrics)
                if improved:
                    checkpoint.save_model_file(run_dir / "best.pt", raw_model, config_dict, epoch, metrics)
                track_epoch(tracker, cfg, raw_model, row, evaluation, test_images, accelerator.device, improved)
            stopping = _stop_agreed(stop, accelerator, step, every_step=True)
            if stopping or epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs:
                saved = save_full_state(accelerator, run_dir, {"epoch": epoch + 1, "batches_done": 0, "step": step,
                                                               "best": best}, cfg.train.keep_checkpoints,
                                        state_bytes)
                if stopping and epoch < cfg.train.epochs:
                    _stop_after_checkpoint(stop, accelerator, console, saved, epoch + 1, 0, steps_per_epoch)
    except BaseException as error:
        tracker.interrupted(preempted=stop.signal_name in ("SIGUSR1", "SIGTERM"),  # Slurm: resumed later
                            exit_code=getattr(error, "exit_code", 1))
        raise
    finally:
        stop.uninstall()

    if evaluation is None:  # nothing left to train: the run had already reached train.epochs
        console.info(f"{run_dir} already finished {cfg.train.epochs} epochs; raise train.epochs to train further")
        evaluation = test_pass()

    checksums = accelerator.gather(torch.tensor([_param_checksum(raw_model)], dtype=torch.float64,
                                                device=accelerator.device)).tolist()
    final = {
        "epoch": history[-1]["epoch"] if history else cfg.train.epochs,
        "train/loss": history[-1]["train/loss"] if history else float("nan"),
        "val/loss": evaluation["val/loss"],
        "val/recon": evaluation["val/recon"],
        "val/kl": evaluation["val/kl"],
        "best/val_loss": best["val/loss"],
        "best/epoch": best["epoch"],
        "wall_time_s": time.perf_counter() - started,
        "num_processes": accelerator.num_processes,
        "param_checksum_per_rank": checksums,
        "run_dir": str(run_dir),
    }
    if main:
        if cfg.log.figures:
            write_figures(raw_model, history, test_images, evaluation, run_dir, accelerator.device)
        checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(final, indent=1))
        console.summary_table(f"{run_dir}: done", {k: v for k, v in final.items()
                                                   if k not in ("param_checksum_per_rank", "run_dir")})
        tracker.summary({**{k: v for k, v in final.items() if k not in ("train/loss", "param_checksum_per_rank",
                                                                         "run_dir")},
                         "train/epoch_loss": final["train/loss"],
                         "train_time_s": sum(row["epoch_time_s"] for row in history)})  # over all restarts
    accelerator.wait_for_everyone()
    tracker.end_training()  # accelerator.end_training(), a W&B failure there made a warning
    return final
