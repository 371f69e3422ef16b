"""Resuming a run: which settings a resumed run may change, how the config wins over the saved optimizer and
schedule, and which full state every process loads."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, synchronize_rng_states
from accelerate.utils.constants import SCALER_NAME

from ..cluster.run_dir import read_metrics
from ..config import Config, config_from_dict, config_to_dict, flat_keys
from ..console import RunConsole
from ..errors import HarnessError, TrainingError, first_line
from ..storage import checkpoint
from .run_state import RunState


def saved_config(run_dir: Path) -> Config | None:
    """The config of the run's last start (its config.yaml), or None when there is none or it does not load."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return None
    import yaml

    try:
        return config_from_dict(yaml.safe_load(saved_path.read_text()))
    except (HarnessError, yaml.YAMLError):
        return None  # unreadable: the checkpoint load will say whether the state still fits


def check_resumable(run_dir: Path, cfg: Config, say=None) -> None:
    """Settings a resumed run cannot change: the model (the state would not fit), the learning-rate schedule
    (the saved scheduler state is of the other kind) and whether it keeps an EMA of the weights. Those it may
    change (train.epochs, train.lr, the batch size, ...) are named through `say`, so that a resume with another
    setting (a second sweep into the same run directory, say) is never silent."""
    saved = saved_config(run_dir)
    if saved is None:
        return
    if say is not None and (changed := _changes(saved, cfg)):
        say(f"resuming {run_dir} with settings changed since its last start: {', '.join(changed)}")
    if saved.model != cfg.model:
        raise TrainingError(f"{run_dir} holds a run with a different model ({saved.model}); to train this one "
                            f"pass a new run.dir=..., or train.resume=false to move the old run aside")
    if saved.train.lr_schedule != cfg.train.lr_schedule:
        raise TrainingError(f"{run_dir} was trained with train.lr_schedule={saved.train.lr_schedule}, not "
                            f"{cfg.train.lr_schedule}; resume with the same schedule, or pass a new run.dir=...")
    if saved.train.ema_decay is None and cfg.train.ema_decay is not None:
        raise TrainingError(f"{run_dir} was trained without an average of the weights (train.ema_decay=null) and "
                            f"cannot start one on resume; resume with train.ema_decay=null, or pass a new run.dir=...")
    if saved.train.ema_decay is not None and cfg.train.ema_decay is None:  # another decay is fine: same state
        raise TrainingError(f"{run_dir} keeps an average of the weights (train.ema_decay={saved.train.ema_decay}) "
                            f"and cannot drop it on resume; resume with train.ema_decay set, or pass a new "
                            f"run.dir=...")


# How an epoch's order is drawn (vae.datasets.batches.EpochBatches); a mid-epoch state saved with another one cannot
# go on.
BATCH_ORDER = "epoch-batches-1"


def batch_order_settings(cfg: Config) -> dict:
    """The settings that decide which images an epoch's batches hold, saved with a mid-epoch checkpoint."""
    return {"order": BATCH_ORDER, "train.batch_size": cfg.train.batch_size,
            "train.grad_accum_steps": cfg.train.grad_accum_steps, "train.seed": cfg.train.seed,
            "data.train_subset": cfg.data.train_subset}


# Settings added to batch_order_settings after states were saved without them: their value in those states.
_BATCH_ORDER_DEFAULTS = {"train.grad_accum_steps": 1}


def check_mid_epoch_resume(cfg: Config, state: RunState) -> None:
    """A run stopped mid-epoch goes on with the rest of that epoch's batches: only the same batch size, seed and
    training subset give the same batches."""
    if not state.mid_epoch:
        return
    saved = state.so_far.batch_order
    if saved.get("order") != BATCH_ORDER:
        raise TrainingError(f"the run stopped in the middle of epoch {state.epoch} under an older version of "
                            f"this harness, whose batches were drawn differently; resume it with that version, or "
                            f"pass a new run.dir=...")
    for key, now in batch_order_settings(cfg).items():
        was = saved.get(key, _BATCH_ORDER_DEFAULTS.get(key, now))
        if was != now:
            raise TrainingError(f"the run stopped in the middle of epoch {state.epoch} with {key}={was}; "
                                f"resume with {key}={was} (change it once that epoch is done), or pass a "
                                f"new run.dir=...")


def follow_config_lr(optimizer, scheduler, cfg: Config, total_steps: int, position: int,
                      console: RunConsole) -> None:
    """A resumed optimizer (and cosine scheduler) carry the learning rate and schedule of the run's earlier start.
    The config wins: a changed train.lr (e.g. lowered after the loss diverged), or for a cosine schedule a changed
    length (train.epochs) or steps per epoch (train.batch_size, data.train_subset), takes effect from the resumed
    step on. `position`: where the run resumes, in steps of this start's schedule; scheduler: None for a constant
    rate. Nothing is touched when nothing changed, so an unchanged resume stays bit-exact."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps it
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        _follow_stages(inner, groups, cfg, position, console)
        return
    saved_lr = float(inner.base_lrs[0] if inner is not None else groups[0]["lr"])  # a tensor under cuda_graph
    saved_length, saved_position = (inner.T_max, inner.last_epoch) if inner is not None else (None, None)
    # isclose: a state saved under train.cuda_graph by an earlier version holds the rate as a float32 tensor (1e-3
    # reads back as 0.0010000000475)
    lr_changed = not math.isclose(saved_lr, cfg.train.lr, rel_tol=1e-6)
    schedule_changed = inner is not None and (saved_length, saved_position) != (total_steps, position)
    if not (lr_changed or schedule_changed):
        return
    lr_now = cfg.train.lr
    if inner is not None:
        # The same fraction of the run done, in the new schedule's steps (the recursive form of
        # CosineAnnealingLR carries on from the learning rate set here).
        inner.base_lrs = [cfg.train.lr] * len(inner.base_lrs)
        inner.T_max, inner.last_epoch = total_steps, position
        progress = min(position, total_steps) / total_steps
        lr_now = inner.eta_min + (cfg.train.lr - inner.eta_min) * (1 + math.cos(math.pi * progress)) / 2
        inner._last_lr = [lr_now] * len(inner.base_lrs)
    _set_lr(groups, cfg.train.lr, lr_now)
    changes = []
    if lr_changed:
        changes.append(f"train.lr {saved_lr:g} -> {cfg.train.lr:g}")
    if schedule_changed:
        changes.append(f"cosine schedule at step {position} of {total_steps} (was {saved_position} of "
                       f"{saved_length})")
    console.info(f"resumed with {', '.join(changes)}: learning rate now {lr_now:g}")


def _set_lr(groups: list[dict], initial: float, now: float) -> None:
    for group in groups:
        group["initial_lr"] = initial
        if isinstance(group["lr"], torch.Tensor):  # train.cuda_graph: the captured step reads this tensor
            group["lr"].fill_(now)
        else:
            group["lr"] = now


def _follow_stages(inner, groups: list[dict], cfg: Config, position: int, console: RunConsole) -> None:
    """train.lr_schedule=iwae: the rate is a function of the epoch alone, so a resume takes it from this start's
    train.lr and its position in this start's steps (a changed train.batch_size or data.train_subset moves the
    step count, never the epoch)."""
    saved_lr, saved_position = float(inner.base_lrs[0]), inner.last_epoch
    if math.isclose(saved_lr, cfg.train.lr, rel_tol=1e-6) and saved_position == position:
        return
    inner.base_lrs, inner.last_epoch = [cfg.train.lr] * len(inner.base_lrs), position
    lr_now = cfg.train.lr * inner.lr_lambdas[0](position)
    inner._last_lr = [lr_now] * len(inner.base_lrs)
    _set_lr(groups, cfg.train.lr, lr_now)
    console.info(f"resumed with train.lr {cfg.train.lr:g} at step {position} of the iwae schedule (was "
                 f"{saved_lr:g} at step {saved_position}): learning rate now {lr_now:g}")


# What loading says when a state does not fit this run's model or optimizer (not damage: an older state of the
# same run would not fit either).
_MISFIT_DETAILS = ("size mismatch", "Missing key(s)", "Unexpected key(s)", "loaded state dict contains a parameter",
                   "loaded state dict has a different number")
_MISFIT_WORDS = (*_MISFIT_DETAILS, "Error(s) in loading")


def resume_full_state(accelerator: Accelerator, run_dir: Path, cfg: Config, console: RunConsole) -> RunState:
    """Load the newest full state that loads; a damaged newer one is skipped with a warning, a state that does not
    fit this run is refused naming the settings that changed. Returns where the run stands, with the
    metrics.jsonl rows of the epochs that state had finished."""
    states = checkpoint.complete_states(run_dir)
    failures, unloadable = [], []
    for _, directory in reversed(states):
        problems = [p for p in gather_object([_load(accelerator, directory, console)]) if p]
        if problems:  # every process resumes from the same state: one that failed anywhere is skipped everywhere
            misfit = next((p for p in problems if any(words in p for words in _MISFIT_WORDS)), None)
            if misfit:
                raise TrainingError(f"{directory} does not fit this run's model and optimizer ({misfit[:200]}); "
                                    f"{_changed_settings(run_dir, cfg)}: resume with the settings it was saved "
                                    f"with, or pass a new run.dir=...")
            failures.append(f"{directory.name}: {problems[0]}")
            unloadable.append(directory)
            console.warn(f"cannot resume from {directory} ({problems[0]}); trying an older checkpoint")
            continue
        # Only now, with an older state loaded, are the newer ones known to be damaged rather than unreadable
        # for a while (a busy GPU, a file server's hiccup): set aside, so that pruning never keeps them as newest.
        for newer in unloadable:
            console.warn(f"{newer.name} {_set_aside(accelerator, newer)}")
        _same_noise_on_every_rank(accelerator)
        state = RunState.from_trainer_state(checkpoint.read_trainer_state(directory))
        state.history = read_metrics(run_dir / "metrics.jsonl", up_to_epoch=state.epoch - 1)
        where = f"epoch {state.epoch}" + (f", batch {state.batches_done}" if state.mid_epoch else "")
        console.info(f"resuming {run_dir} from {directory.name} ({where})")
        return state
    raise TrainingError(f"no checkpoint in {run_dir} could be loaded ({'; '.join(failures)}); pass a new "
                        f"run.dir=... or train.resume=false to start over")


def _set_aside(accelerator: Accelerator, directory: Path) -> str:
    """A state that failed to load is renamed by the main process (once every process has tried it), so that it
    is no longer taken for the newest state: pruning after the next save would keep it and delete good ones."""
    accelerator.wait_for_everyone()
    said = None
    if accelerator.is_main_process:
        try:
            said = f"set aside as {checkpoint.set_aside(directory).name} (rename it back to try it again)"
        except OSError as e:
            said = f"could not set it aside ({first_line(e)})"
    accelerator.wait_for_everyone()
    return said or "set aside"


def _load(accelerator: Accelerator, directory: Path, console: RunConsole) -> str | None:
    """Load one full state; None when it loaded, else the first line of why not. A state saved without fp16's
    loss scaler (another train.mixed_precision) resumed under fp16 starts with a fresh scaler."""
    scaler = accelerator.scaler
    if scaler is not None and not (directory / SCALER_NAME).is_file():
        console.info(f"{directory.name} holds no fp16 loss scaler (saved under another train.mixed_precision): "
                     f"the scaler starts afresh")
        accelerator.scaler = None  # load_state would look for its file
    try:
        accelerator.load_state(str(directory))
    except Exception as e:  # damaged (e.g. killed while saving, truncated) or of another shape
        # torch lists a misfit below a general first line: the first listed one says what does not fit
        misfit = next((line.strip() for line in str(e).splitlines() if line.strip().startswith(_MISFIT_DETAILS)), None)
        return (misfit or first_line(e))[:300]
    finally:
        accelerator.scaler = scaler
    return None


def _changes(saved: Config, cfg: Config) -> list[str]:
    """What a run's settings changed since `saved` ("key=before -> now"), leaving out where it is written and
    logged (run.*, log.*, data.root)."""
    before, now = flat_keys(config_to_dict(saved)), flat_keys(config_to_dict(cfg))
    return [f"{key}={before.get(key)} -> {now.get(key)}" for key in sorted(before.keys() | now.keys())
            if before.get(key) != now.get(key) and not key.startswith(("run.", "log.", "data.root"))]


def _changed_settings(run_dir: Path, cfg: Config) -> str:
    saved = saved_config(run_dir)
    if saved is None:
        return f"{run_dir} has no readable config.yaml to say which setting changed"
    changed = _changes(saved, cfg)
    return "changed since it was saved: " + ", ".join(changed) if changed else "no setting changed since it was saved"


def _same_noise_on_every_rank(accelerator: Accelerator) -> None:
    """The training noise is drawn alike on every rank (vae.training.step), so every rank carries rank 0's generator
    state: also when the run resumes on more processes than saved it (the new ranks have no saved state)."""
    if accelerator.num_processes > 1:
        synchronize_rng_states(["torch", "cuda"] if accelerator.device.type == "cuda" else ["torch"])
