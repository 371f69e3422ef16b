"""The training loop, top to bottom: launch checks, data, model, resume, then per epoch train -> test -> checkpoint,
then figures. Every process runs this code; only the main process prints and writes files.

Accelerate wraps the model, optimizer, scheduler and both DataLoaders, so the same code runs on a CPU, one GPU,
several GPUs or nodes (DDP/NCCL) and several CPU processes (DDP/gloo). `train.batch_size` is the GLOBAL batch:
each process trains its share of every batch (vae.data.EpochBatches) with the noise it would get alone
(vae.step), so 1 or N processes train the same model from the same config.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, gather_object, set_seed

from . import checkpoint, plots, tracking
from .config import Config, ConfigError, config_from_dict, config_to_dict, dump_yaml
from .console import RunConsole
from .data import EpochBatches, ensure_mnist, load_mnist, share_bounds, to_unit_float
from .evaluation import model_figures
from .errors import HarnessError, first_line
from .model import VAE, negative_elbo_terms
from .step import TrainStep, make_optimizer, make_train_step, restore_step_settings
from .preemption import EXIT_CODES, StopRequest, requeue_slurm_job, slurm_job_id


class TrainingError(HarnessError):
    """Training cannot go on (wrong launch, non-finite loss, incompatible run directory)."""


# ---------------------------------------------------------------------------------------------------------
# Setup


def make_accelerator(cfg: Config) -> Accelerator:
    return Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,  # None: the launcher's --mixed_precision / config file
        # The loop steps the schedule once per global batch, applied or skipped (Accelerate's default would step
        # it N times per batch with N processes, and not at all after a skipped fp16 update).
        step_scheduler_with_optimizer=False,
        # A CUDA graph cannot hold autocast's cache of cast weights (torch.cuda.graphs' rule for autocast).
        kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if cfg.train.cuda_graph else [],
        log_with=tracking.log_with(cfg.log.wandb),  # None when log.wandb=false: wandb is never imported
    )


def _launcher_process_count() -> int:
    """How many processes the user asked the launcher for, as far as this process can tell."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return world
    # `accelerate launch --cpu --num_processes 2` starts one process and sets nothing that says 2; the
    # launcher's own command line (our parent process) still does.
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return 1
    args = [a.decode(errors="replace") for a in argv]
    if "launch" not in args:
        return 1
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1])
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return int(value) if value.isdigit() else 1
    return 1


def check_launch(cfg: Config, accelerator: Accelerator, console: RunConsole) -> None:
    requested = _launcher_process_count()
    if requested > 1 and accelerator.num_processes == 1:
        if torch.cuda.is_available() and not cfg.train.cpu:
            fix = "launch with --multi_gpu and one GPU per process"
        else:
            fix = ("on CPU use: accelerate launch --multi_gpu --num_processes N train.py ... train.cpu=true "
                   "(the --cpu launcher flag starts a single process)")
        raise TrainingError(f"launched as {requested} processes but Accelerate sees only one, so each would train "
                            f"alone; {fix}")
    if cfg.train.cuda_graph:
        _check_cuda_graph(cfg, accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        console.warn("fp16 mixed precision does nothing on CPU (Accelerate ignores it): training in fp32. "
                     "Use bf16 for mixed precision on CPU, or fp16 on a GPU.")


def _check_cuda_graph(cfg: Config, accelerator: Accelerator) -> None:
    """train.cuda_graph replays one captured step: it needs CUDA, fixed work per step, and no host decision."""
    problems = {
        accelerator.device.type != "cuda": f"needs a CUDA device (this run is on {accelerator.device})",
        accelerator.num_processes > 1: f"runs on one process (this run has {accelerator.num_processes})",
        accelerator.mixed_precision == "fp16": "does not support fp16 (its loss scaler decides on the host); use "
                                               "bf16",
        cfg.train.compile: "and train.compile are exclusive",
        cfg.train.skip_nonfinite > 0: "and train.skip_nonfinite (a per-step host check) are exclusive",
    }
    for bad, why in problems.items():
        if bad:
            raise ConfigError(f"train.cuda_graph: {why}; set train.cuda_graph=false or change the launch")


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _data_on_device(cfg: Config, accelerator: Accelerator) -> bool:
    return cfg.data.on_device if cfg.data.on_device is not None else accelerator.device.type == "cuda"


def environment_info(accelerator: Accelerator) -> dict:
    import torchvision

    return {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "host": platform.node(),
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else
        platform.processor() or platform.machine(),
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------
# Run directory and resume


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= up_to_epoch:
                rows.append(row)
    # keep one row per epoch (the last written), in epoch order
    return sorted({row["epoch"]: row for row in rows}.values(), key=lambda r: r["epoch"])


def _saved_config(run_dir: Path) -> Config | None:
    """The config of the run's last start (its config.yaml), or None when there is none or it does not load."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    import yaml

    try:
        return config_from_dict(yaml.safe_load(saved_path.read_text()))
    except (HarnessError, yaml.YAMLError):
        return None  # unreadable: the checkpoint load will say whether the state still fits


def _check_resumable(run_dir: Path, cfg: Config) -> None:
    """Settings a resumed run cannot change: the model (the state would not fit) and the learning-rate schedule
    (the saved scheduler state is of the other kind)."""
    saved = _saved_config(run_dir)
    if saved is None:
        return
    if saved.model != cfg.model:
        raise TrainingError(f"{run_dir} holds a run with a different model ({saved.model}); to train this one "
                            f"pass a new run.dir=..., or train.resume=false to move the old run aside")
    if saved.train.lr_schedule != cfg.train.lr_schedule:
        raise TrainingError(f"{run_dir} was trained with train.lr_schedule={saved.train.lr_schedule}, not "
                            f"{cfg.train.lr_schedule}; resume with the same schedule, or pass a new run.dir=...")


def _batch_order_settings(cfg: Config) -> dict:
    """The settings that decide which images an epoch's batches hold, saved with a mid-epoch checkpoint."""
    return {"train.batch_size": cfg.train.batch_size, "train.seed": cfg.train.seed,
            "data.train_subset": cfg.data.train_subset}


def _check_mid_epoch_resume(cfg: Config, state: dict) -> None:
    """A run stopped mid-epoch goes on with the rest of that epoch's batches: only the same batch size, seed and
    training subset give the same batches."""
    saved = state.get("partial", {}).get("batch_order", {}) if state["batches_done"] else {}
    for key, now in _batch_order_settings(cfg).items():
        if key in saved and saved[key] != now:
            raise TrainingError(f"the run stopped in the middle of epoch {state['epoch']} with {key}={saved[key]}; "
                                f"resume with {key}={saved[key]} (change it once that epoch is done), or pass a "
                                f"new run.dir=...")


def _follow_config_lr(optimizer, scheduler, cfg: Config, total_steps: int, position: int,
                      console: RunConsole) -> None:
    """A resumed optimizer and scheduler carry the learning rate and schedule of the run's earlier start. The
    config wins: a changed train.lr (e.g. lowered after the loss diverged), or for a cosine schedule a changed
    length (train.epochs) or steps per epoch (train.batch_size, data.train_subset), takes effect from the resumed
    step on. `position`: where the run resumes, in steps of this start's schedule. Nothing is touched when
    nothing changed, so an unchanged resume stays bit-exact."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    saved_lr = float(inner.base_lrs[0])  # a device tensor under train.cuda_graph
    cosine = isinstance(inner, torch.optim.lr_scheduler.CosineAnnealingLR)
    saved_length, saved_position = (inner.T_max, inner.last_epoch) if cosine else (None, None)
    lr_changed = saved_lr != cfg.train.lr
    schedule_changed = cosine and (saved_length, saved_position) != (total_steps, position)
    if not (lr_changed or schedule_changed):
        return
    inner.base_lrs = [cfg.train.lr] * len(inner.base_lrs)
    if cosine:
        # The same fraction of the run done, in the new schedule's steps (the recursive form of
        # CosineAnnealingLR carries on from the learning rate set here).
        inner.T_max, inner.last_epoch = total_steps, position
        progress = min(position, total_steps) / total_steps
        lr_now = inner.eta_min + (cfg.train.lr - inner.eta_min) * (1 + math.cos(math.pi * progress)) / 2
    else:
        lr_now = cfg.train.lr
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.train.lr
        if isinstance(group["lr"], torch.Tensor):  # train.cuda_graph: the captured step reads this tensor
            group["lr"].fill_(lr_now)
        else:
            group["lr"] = lr_now
    inner._last_lr = [lr_now] * len(inner.base_lrs)
    changes = []
    if lr_changed:
        changes.append(f"train.lr {saved_lr:g} -> {cfg.train.lr:g}")
    if schedule_changed:
        changes.append(f"cosine schedule at step {position} of {total_steps} (was {saved_position} of "
                       f"{saved_length})")
    console.info(f"resumed with {', '.join(changes)}: learning rate now {lr_now:g}")


def prepare_run_dir(cfg: Config, accelerator: Accelerator, console: RunConsole) -> tuple[bool, Path]:
    """Returns (resume?, run_dir). Moves an old run aside when resume=false."""
    run_dir = cfg.run_dir
    if checkpoint.complete_states(run_dir) and cfg.train.resume:
        _check_resumable(run_dir, cfg)
        return True, run_dir
    if accelerator.is_main_process and run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.train.resume:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            moved = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
            run_dir.rename(moved)
            console.info(f"train.resume=false: moved the previous run to {moved}")
    accelerator.wait_for_everyone()
    return False, run_dir


ROOM_FOR_LOGS_AND_FIGURES = 32 * 2**20  # metrics, PNGs, W&B's run files: a z2 run writes about 5 MiB of them


def full_state_bytes(model: torch.nn.Module) -> int:
    """About the size of one full training state: the float32 weights and Adam's two moments."""
    return 3 * 4 * sum(p.numel() for p in model.parameters())


def space_needed(model: torch.nn.Module, cfg: Config) -> int:
    """Bytes a run directory needs at its fullest: train.keep_checkpoints full states plus the one being written
    before the oldest is pruned, last.pt and best.pt (weights only), the model files W&B stages for upload when
    log.checkpoint_artifacts is on, and room for logs and figures."""
    full_state = full_state_bytes(model)
    weights = full_state // 3
    staged = 2 * weights * cfg.train.epochs if cfg.log.wandb and cfg.log.checkpoint_artifacts else 0
    return (cfg.train.keep_checkpoints + 1) * full_state + 2 * weights + staged + ROOM_FOR_LOGS_AND_FIGURES


def _bytes_held(run_dir: Path) -> int:
    """What the run directory already holds of what space_needed counts (a resumed run reuses that room)."""
    held = 0
    for path in [run_dir / "last.pt", run_dir / "best.pt", *(run_dir / "checkpoints").rglob("*"),
                 *(run_dir / "wandb" / "data").rglob("*")]:
        try:
            held += path.stat().st_size if path.is_file() else 0
        except OSError:
            pass
    return held


def _room_or_fail(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    needed = max(needed - _bytes_held(run_dir), ROOM_FOR_LOGS_AND_FIGURES)
    if free < needed:
        raise TrainingError(f"run directory {run_dir} has {free / 2**20:.1f} MiB free, this run needs about "
                            f"{needed / 2**20:.1f} MiB (checkpoints, model files, figures); free some space, "
                            f"lower train.keep_checkpoints or pass run.dir=<a roomier path>")


def _disk_full(error: BaseException, run_dir: Path) -> TrainingError | None:
    """A write that failed for want of space, as the one-line error that says what is kept and what to do."""
    if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
        return None
    states = checkpoint.complete_states(run_dir)
    kept = f"the last complete checkpoint ({states[-1][1].name}) is kept" if states else "no checkpoint was saved yet"
    where = f" writing {error.filename}" if error.filename else ""
    return TrainingError(f"no space left on the device{where}: {kept}; free some space and run the same command "
                         f"again to resume")


def _writable_or_fail(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"run directory {run_dir} is not writable ({e.strerror}); pass run.dir=<a writable "
                            f"path> or free some space") from None


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
    per_rank = accelerator.gather(torch.tensor([seen], device=accelerator.device)).tolist()
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
    model = accelerator.unwrap_model(model)  # no DDP for a pass without gradients; autocast stays
    model.eval()
    lo, hi = share_bounds(len(images), accelerator.num_processes, accelerator.process_index)
    chunk = max(1, batch_size // accelerator.num_processes)
    rows = [torch.zeros(0, 2 + noise.shape[1], device=accelerator.device)]
    for start in range(lo, hi, chunk):
        end = min(start + chunk, hi)
        x = to_unit_float(images[start:end].to(accelerator.device))
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


def gather_shares(local: torch.Tensor, count: int, accelerator: Accelerator) -> torch.Tensor:
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


def resume_full_state(accelerator: Accelerator, run_dir: Path, console: RunConsole) -> dict:
    """Load the newest full state that loads; a damaged newer one is skipped with a warning."""
    states = checkpoint.complete_states(run_dir)
    failures = []
    for _, directory in reversed(states):
        try:
            accelerator.load_state(str(directory))
        except Exception as e:  # damaged (e.g. killed while saving, truncated) or of another shape
            first = first_line(e)[:200]
            failures.append(f"{directory.name}: {first}")
            console.warn(f"cannot resume from {directory} ({first}); trying an older checkpoint")
            continue
        state = checkpoint.read_trainer_state(directory)
        where = f"epoch {state['epoch']}" + (f", batch {state['batches_done']}" if state["batches_done"] else "")
        console.info(f"resuming {run_dir} from {directory.name} ({where})")
        return state
    raise TrainingError(f"no checkpoint in {run_dir} could be loaded ({'; '.join(failures)}); pass a new "
                        f"run.dir=... or train.resume=false to start over")


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
        return _train(cfg)
    except OSError as error:  # any write, checkpoint or figure, that found the disk full
        disk_full = _disk_full(error, cfg.run_dir)
        if disk_full is not None:
            raise disk_full from None
        raise


def _train(cfg: Config) -> dict:
    started = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    accelerator = make_accelerator(cfg)
    console = RunConsole(accelerator.is_main_process)
    check_launch(cfg, accelerator, console)
    main = accelerator.is_main_process

    # Data: the node's first process fetches and verifies; the others then only verify.
    with accelerator.local_main_process_first():
        ensure_mnist(cfg.data.root, download=cfg.data.download, say=console.info)
    train_images, train_labels = load_mnist(cfg.data.root, train=True)
    test_images, test_labels = load_mnist(cfg.data.root, train=False)
    if cfg.data.train_subset:
        train_images, train_labels = train_images[: cfg.data.train_subset], train_labels[: cfg.data.train_subset]
    data_device = accelerator.device if _data_on_device(cfg, accelerator) else torch.device("cpu")
    train_images, test_images_here = train_images.to(data_device), test_images.to(data_device)
    batches = EpochBatches(train_images, cfg.train.batch_size, cfg.train.seed, accelerator.process_index,
                           accelerator.num_processes)
    # The test pass's noise: one fixed draw per image, so val/loss moves only with the model, and is the same
    # on any device and any number of processes.
    test_noise = torch.randn(len(test_images), cfg.model.z_dim,
                             generator=torch.Generator().manual_seed(cfg.train.seed)).to(accelerator.device)

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
                                 cfg.model.z_dim, guard_nonfinite=cfg.train.skip_nonfinite > 0)

    # Run directory: resume from the newest complete state, or start fresh.
    resume, run_dir = prepare_run_dir(cfg, accelerator, console)
    state_bytes = full_state_bytes(raw_model)
    if main:
        _writable_or_fail(run_dir)
        _room_or_fail(run_dir, space_needed(raw_model, cfg))
    accelerator.wait_for_everyone()
    start_epoch, step, skip_batches, partial = 1, 0, 0, {}
    best = {"val/loss": float("inf"), "epoch": None}
    if resume:
        resumed = resume_full_state(accelerator, run_dir, console)
        restore_step_settings(optimizer, accelerator.device, cfg.train.cuda_graph)
        _check_mid_epoch_resume(cfg, resumed)
        _follow_config_lr(optimizer, scheduler, cfg, total_steps,
                          (resumed["epoch"] - 1) * steps_per_epoch + resumed["batches_done"], console)
        start_epoch, step, skip_batches, best = (resumed["epoch"], resumed["step"], resumed["batches_done"],
                                                 resumed["best"])
        partial = resumed.get("partial", {})
    history = _read_metrics(run_dir / "metrics.jsonl", up_to_epoch=start_epoch - 1)

    def test_pass() -> dict:
        return evaluate_test_set(model, test_images_here, test_labels, test_noise, accelerator,
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
                                "batch_order": _batch_order_settings(cfg)}},
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
