"""The training loop, top to bottom: `train()` sets the run up, then each epoch trains, scores the test set,
reports and checkpoints; at the end come the figures and the summary. Every process runs this code; only the main
process prints and writes files.

Accelerate wraps the model, optimizer and scheduler, so the same code runs on a CPU, one GPU, several GPUs or
nodes (DDP/NCCL) and several CPU processes (DDP/gloo). `train.batch_size` is the GLOBAL batch: each process trains
its share of every batch (vae.datasets.batches.EpochBatches) with the noise it would get alone (vae.training.step),
so 1 or N processes train the same model from the same config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .. import tracking
from ..cluster import run_dir
from ..cluster.launch import StepChoice, check_training_launch, cpu_threads, make_accelerator
from ..cluster.preemption import WARNINGS, StoppedToResume, StopRequest, leave_after_checkpoint, record_start
from ..cluster.rank_logs import start_rank_log
from ..cluster.run_dir import (
    check_paths,
    disk_full_error,
    full_state_bytes,
    prepare_run_dir,
    room_or_fail,
    space_needed,
)
from ..config import Config, config_to_dict
from ..console import RunConsole
from ..datasets.batches import TrainingData, load_training_data
from ..evaluation.scoring import evaluate_test_set
from ..figures import model_figures as figures
from ..models import VAE, build_model
from ..storage import checkpoint
from ..storage.files import open_append
from . import perf
from .ema import WeightAverage, weight_average
from .optim import restore_step_settings
from .profiling import StepProfiler
from .progress import ProgressReport
from .resume import batch_order_settings, check_mid_epoch_resume, check_resumable, follow_config_lr, resume_full_state
from .run_state import EpochResult, EpochSoFar, RunState
from .step import (
    NonFiniteSteps,
    TrainStep,
    applied_updates,
    prepare_optimization,
    stop_if_not_finite,
    train_step_for,
)

VAL_KEYS = ("val/loss", "val/recon", "val/kl")  # the test pass's numbers, of the trained weights
EMA_VAL_KEYS = tuple(key.replace("val/", "val_ema/") for key in VAL_KEYS)  # of their average (train.ema_decay)

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


def _train(cfg: Config, cleanup: contextlib.ExitStack) -> dict:
    clock = perf.StartupClock()
    check_paths(cfg)  # before anything is made or written: a user's own folder is left alone
    accelerator = make_accelerator(cfg)
    if threads := cpu_threads(cfg, accelerator):
        torch.set_num_threads(threads)
    console = RunConsole(accelerator.is_main_process)
    step_choice = check_training_launch(cfg, accelerator, console)
    clock.mark("accelerator")
    # The run directory: this training's alone (a second one there stops here), resumed or started afresh.
    resume, lock = prepare_run_dir(cfg, accelerator, console)
    if lock is not None:
        cleanup.callback(lock.release)
    if cfg.log.per_rank_logs:
        start_rank_log(cfg.run_dir, accelerator.process_index)
    if resume:
        check_resumable(cfg.run_dir, cfg, console.info)
    # From here on, start-up included, SIGTERM/SIGUSR1/SIGUSR2/Ctrl-C stop the run at a checkpoint; Slurm's warning
    # during start-up stops it before its first step, with nothing new to save (vae.cluster.preemption caps such
    # starts).
    stop = StopRequest().install()
    cleanup.callback(stop.uninstall)
    if accelerator.is_main_process:
        record_start(cfg.run_dir)
    clock.mark("run_dir")
    data = load_training_data(cfg, accelerator, console.info)
    clock.mark("data")
    loop = _build_loop(cfg, accelerator, console, data, stop, step_choice, clock)
    cleanup.callback(loop.profiler.stop)
    state = _resume(loop) if resume else RunState()
    first_step = state.step
    if accelerator.is_main_process:
        run_dir.write_run_files(cfg, accelerator, console, state.history, loop.data, step_choice)
    clock.mark("resume" if resume else "run_files")
    loop.tracker = tracking.Tracker.start(accelerator, console, log=cfg.log, run_name=cfg.run.name, resumed=resume,
                                          run_dir=cfg.run_dir, config=loop.config_dict, resumed_at=first_step,
                                          stop_requested=lambda: stop.requested)
    cleanup.callback(loop.tracker.settle_start)  # W&B starts in the background: never left running at the exit
    loop.tracker.define_epoch_metrics()
    clock.mark("tracker")
    evaluation, drawn = None, None
    try:
        if stop.agreed(accelerator, state.step, every_step=True, warnings_only=True):
            leave_after_checkpoint(stop, accelerator, None, "start-up, before its first step")
        while state.epoch <= cfg.train.epochs and not state.stops_early(cfg.train.early_stop_patience):
            evaluation, drawn = _run_epoch(loop, state)
    except BaseException as error:
        loop.tracker.interrupted(preempted=stop.stop_signal in (*WARNINGS, "SIGTERM"),  # Slurm resumes it
                                 exit_code=getattr(error, "exit_code", 1))
        if isinstance(error, StoppedToResume):  # after W&B has finished: a requeue SIGTERMs the whole job
            error.settle(cfg.run_dir, state.step - first_step, accelerator.is_main_process)
        raise
    if stopped_early := state.early_stop_reason(cfg.train.early_stop_patience):
        console.info(stopped_early)
    elif evaluation is None:  # nothing left to train: the run had already reached train.epochs
        console.info(f"{cfg.run_dir} already finished {cfg.train.epochs} epochs; raise train.epochs to train further")
    return _finish(loop, state, evaluation or loop.test_pass(), drawn, time.perf_counter() - clock.started)


# ---------------------------------------------------------------------------------------------------------
# Setting up: data, model, optimisation


@dataclasses.dataclass
class Loop:
    """What every epoch works with: built once by train()."""

    cfg: Config
    accelerator: Accelerator
    console: RunConsole
    data: TrainingData
    raw_model: VAE  # the plain module: figures, model files and the test pass (no DDP, no compiled graph)
    ema: WeightAverage | None  # train.ema_decay: the average of raw_model's weights, else None
    train_step: TrainStep
    scheduler: object | None  # a cosine schedule, or None for a constant rate
    nonfinite: NonFiniteSteps
    stop: StopRequest
    profiler: StepProfiler
    step_choice: StepChoice  # the eager step or the CUDA graph, and why
    startup: perf.StartupClock
    tracker: tracking.Tracker | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.batches)

    @property
    def config_dict(self) -> dict:
        return config_to_dict(self.cfg)

    @property
    def kept_model(self) -> VAE:
        """The weights the model files hold and the figures show: the EMA when on."""
        return self.ema.module if self.ema is not None else self.raw_model

    def test_pass(self) -> dict:
        """val/* of the trained weights; with an EMA also val_ema/*, and the latents are the EMA's."""
        trained = self._score(self.raw_model)
        if self.ema is None:
            return trained
        averaged = self._score(self.ema.module)
        return {**averaged, **{key: trained[key] for key in VAL_KEYS},
                **{ema_key: averaged[key] for key, ema_key in zip(VAL_KEYS, EMA_VAL_KEYS, strict=True)}}

    def _score(self, model: VAE) -> dict:
        return evaluate_test_set(model, self.data.test_images_here, self.data.test_labels, self.data.test_noise,
                                 self.accelerator, self.cfg.data.eval_batch_size)

    def save_state(self, state: RunState) -> Path:
        return checkpoint.save_full_state(self.accelerator, self.cfg.run_dir, state.trainer_state(),
                                          self.cfg.train.keep_checkpoints,
                                          full_state_bytes(self.raw_model, self.ema is not None))


def _build_loop(cfg: Config, accelerator: Accelerator, console: RunConsole, data: TrainingData,
                stop: StopRequest, step_choice: StepChoice, clock: perf.StartupClock) -> Loop:
    # Every rank is seeded alike and stays alike: the training noise of a global batch is drawn whole on every
    # rank (vae.training.step), so 1 or N processes train the same model.
    set_seed(cfg.train.seed)
    raw_model = build_model(cfg.model, data.image_shape).to(accelerator.device)
    clock.mark("model")
    # The first optimizer imports torch._dynamo (torch.optim's methods are wrapped by torch._disable_dynamo)
    model, optimizer, scheduler = prepare_optimization(raw_model, cfg.train, accelerator, len(data.batches),
                                                      step_choice.cuda_graph)
    clock.mark("optimizer")
    if cfg.train.compile:  # after prepare: the saved states keep the module's own parameter names
        model = torch.compile(model)
    train_step = train_step_for(cfg, step_choice.cuda_graph, model, optimizer, accelerator, data.train_images)
    if accelerator.is_main_process:
        room_or_fail(cfg.run_dir, space_needed(raw_model, cfg))
    accelerator.wait_for_everyone()
    profiler = StepProfiler(cfg.train.profile_steps, cfg.run_dir, accelerator.device, console,
                            enabled=accelerator.is_main_process)
    ema = weight_average(raw_model, cfg.train.ema_decay, accelerator)
    clock.mark("step")
    return Loop(cfg, accelerator, console, data, raw_model, ema, train_step, scheduler,
                NonFiniteSteps(cfg.train.skip_nonfinite, console), stop, profiler, step_choice, clock)


def _resume(loop: Loop) -> RunState:
    """The newest full state that loads, with this start's settings applied on top (vae.training.resume)."""
    cfg, optimizer = loop.cfg, loop.train_step.optimizer
    state = resume_full_state(loop.accelerator, cfg.run_dir, cfg, loop.console)
    restore_step_settings(optimizer, loop.accelerator.device)
    check_mid_epoch_resume(cfg, state)
    steps = loop.steps_per_epoch
    follow_config_lr(optimizer, loop.scheduler, cfg, cfg.train.epochs * steps,
                     (state.epoch - 1) * steps + state.batches_done, loop.console)
    return state


# ---------------------------------------------------------------------------------------------------------
# One epoch: train, score the test set, report, checkpoint


def _run_epoch(loop: Loop, state: RunState) -> tuple[dict, dict | None]:
    """Train state.epoch (on from where a mid-epoch stop left it, its time before the stop counted), then score,
    report and checkpoint it; returns the test pass's numbers and the figures drawn (None when none were due)."""
    cfg, epoch, started = loop.cfg, state.epoch, time.perf_counter() - state.so_far.train_seconds
    with loop.console.epoch_progress(epoch, cfg.train.epochs, loop.steps_per_epoch) as bar:
        trained = train_one_epoch(loop, state, bar)
    state.step = trained.step
    if trained.stopped:
        state.stopped_at(trained, batch_order_settings(cfg), time.perf_counter() - started)
        leave_after_checkpoint(loop.stop, loop.accelerator, loop.save_state(state),
                               f"epoch {epoch}, batch {trained.batches_done}/{loop.steps_per_epoch}")
    train_time = time.perf_counter() - started
    evaluation = loop.test_pass()
    row = _epoch_row(epoch, trained, evaluation, loop, train_time, time.perf_counter() - started)
    improved = state.finish_epoch(row)
    last = epoch == cfg.train.epochs or state.stops_early(cfg.train.early_stop_patience)
    drawn = _report_epoch(loop, row, evaluation, improved, last) if loop.accelerator.is_main_process else None
    stopping = loop.stop.agreed(loop.accelerator, state.step, every_step=True)
    if stopping or epoch % cfg.train.checkpoint_every == 0 or last:
        saved = loop.save_state(state)
        if stopping and not last:
            leave_after_checkpoint(loop.stop, loop.accelerator, saved, f"the start of epoch {epoch + 1}")
    return evaluation, drawn


def train_one_epoch(loop: Loop, state: RunState, bar) -> EpochResult:
    """One pass over state.epoch's batches, from batch state.batches_done on (a mid-epoch resume). Every
    log.every_steps steps: the finiteness check, the progress bar's loss and the train/* metrics; between two
    such checks nothing is read back from the device."""
    accelerator, step_fn, epoch = loop.accelerator, loop.train_step, state.epoch
    step_fn.start_epoch(epoch)
    # A mid-epoch checkpoint holds the sums of all processes together: the main process carries them on.
    so_far = state.so_far if accelerator.is_main_process else EpochSoFar()
    seen = so_far.seen
    sums = step_fn.sums.zero_()  # recon, KL over this rank's images since the epoch (re)started
    progress = ProgressReport(loop, sums, seen)
    step, batches_done, stopped = state.step, state.batches_done, False
    bar.advance(batches_done)
    skipped_before, attempted, updates_before = loop.nonfinite.skipped, 0, applied_updates(step_fn.optimizer)
    waits = perf.DataWait()
    for indices, global_size, share in waits.over(loop.data.batches.epoch(epoch, start=batches_done)):
        if step_fn(indices, global_size, share, step):
            seen += len(indices)
            attempted += 1
            if loop.ema is not None:
                loop.ema.update()
        else:
            loop.nonfinite.skip(epoch, step + 1)
        if loop.scheduler is not None:
            loop.scheduler.step()  # the schedule follows batches, applied or skipped
        step, batches_done = step + 1, batches_done + 1
        loop.profiler.step()
        bar.advance()
        if step % loop.cfg.log.every_steps == 0:
            progress.report(epoch, step, seen, bar)
        if loop.stop.agreed(accelerator, step):
            stopped = True
            break
    totals = accelerator.reduce(torch.tensor([so_far.loss_sum + sums.sum().item(), float(seen),
                                              float(seen - so_far.seen)], dtype=torch.float64,
                                             device=accelerator.device), reduction="sum").tolist()
    result = EpochResult(stopped, step, batches_done, totals[0], int(totals[1]), int(totals[2]))
    if stopped:
        return result
    # per process: the images it trained in this epoch since this start, its waits for data, its peak memory
    mine = [seen - so_far.seen, waits.seconds, perf.peak_memory_mb(accelerator.device)]
    ranks = accelerator.gather(torch.tensor([mine], dtype=torch.float64, device=accelerator.device)).tolist()
    result.per_rank, result.data_wait_s, result.peak_memory_mb = ([int(r[0]) for r in ranks],
                                                                  [r[1] for r in ranks], [r[2] for r in ranks])
    stop_if_not_finite(result.mean_loss, epoch, step)
    # fp16's loss scaler skips the update of a step whose gradients overflowed (fused Adam then leaves its step
    # count alone): those count as skipped too.
    scaler_skipped = attempted - (applied_updates(step_fn.optimizer) - updates_before)
    result.skipped = scaler_skipped + loop.nonfinite.skipped - skipped_before
    return result


# ---------------------------------------------------------------------------------------------------------
# Reporting: the epoch's row, files and W&B; the run's end


def _epoch_row(epoch: int, trained: EpochResult, evaluation: dict, loop: Loop, train_time: float,
               epoch_time: float) -> dict:
    return {
        "epoch": epoch,
        "step": trained.step,
        "train/loss": trained.mean_loss,
        "val/loss": evaluation["val/loss"],
        "val/recon": evaluation["val/recon"], "val/kl": evaluation["val/kl"],
        **{key: evaluation[key] for key in EMA_VAL_KEYS if key in evaluation},
        "samples_per_s": trained.seen / train_time,  # the epoch's, a stop and its resume included
        "epoch_time_s": epoch_time,
        "lr": loop.train_step.lr,
        "samples_per_rank": trained.per_rank,
        "samples_per_s_per_rank": [n / train_time for n in trained.per_rank],
        "data_wait_share": max(trained.data_wait_s) / train_time,  # the process that waited most
        "peak_memory_mb_per_rank": trained.peak_memory_mb,
        "skipped_steps": trained.skipped,
        "val/n_images": evaluation["n_images"],
    }


def _report_epoch(loop: Loop, row: dict, evaluation: dict, improved: bool, last: bool) -> dict | None:
    """Main process: the metrics row, the epoch line, last.pt (and best.pt), and the epoch in W&B: val/* against
    `epoch`; every log.images_every_epochs epochs and after the `last` (early stops too) the figures and the
    latent table; the model file as an artifact when asked. Returns the figures drawn (the last's: the PNGs)."""
    cfg, epoch, tracker = loop.cfg, row["epoch"], loop.tracker
    with open_append(cfg.run_dir / "metrics.jsonl") as f:
        f.write((json.dumps(row) + "\n").encode())
    loop.console.epoch_line(row)
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    weights = "ema" if loop.ema is not None else "trained"
    for name in ("last.pt", "best.pt") if improved else ("last.pt",):
        checkpoint.save_model_file(cfg.run_dir / name, loop.kept_model, loop.config_dict, epoch, metrics, weights)
    tracker.log({"epoch": epoch, "train/epoch_loss": row["train/loss"],
                 **{key: row[key] for key in (*VAL_KEYS, *EMA_VAL_KEYS) if key in row},
                 "perf/samples_per_s": row["samples_per_s"],
                 "perf/data_wait_share": row["data_wait_share"],
                 "perf/peak_memory_mb": max(row["peak_memory_mb_per_rank"])}, step=row["step"], epoch_row=True)
    for_wandb = tracker.figures_due(cfg.log.images_every_epochs, epoch, last)
    drawn = None
    if for_wandb or (cfg.log.figures and last):
        drawn = _draw(loop, evaluation)
    if for_wandb:
        tracker.log_figures(drawn, evaluation["latent_means"], evaluation["labels"], epoch, row["step"],
                            points=cfg.log.latent_points)
    if cfg.log.checkpoint_artifacts:
        tracker.log_model_file(cfg.run_dir / "last.pt", epoch=epoch, best=improved, metrics=metrics)
    return drawn


def _draw(loop: Loop, evaluation: dict) -> dict:
    data, device = (evaluation["latent_means"], evaluation["labels"]), loop.accelerator.device
    return figures.model_figures(loop.kept_model, loop.data.test_images, *data, device,
                                 image_shape=loop.data.image_shape, class_names=loop.data.class_names)


def _param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


def _finish(loop: Loop, state: RunState, evaluation: dict, drawn: dict | None, wall_time: float) -> dict:
    """The final metrics (returned on every process); the main process writes the figures and summary.json."""
    accelerator, cfg, history = loop.accelerator, loop.cfg, state.history
    checksums = accelerator.gather(torch.tensor([_param_checksum(loop.raw_model)], dtype=torch.float64,
                                                device=accelerator.device)).tolist()
    final = {
        "epoch": history[-1]["epoch"] if history else cfg.train.epochs,
        "train/loss": history[-1]["train/loss"] if history else float("nan"),
        "val/loss": evaluation["val/loss"],
        "val/recon": evaluation["val/recon"],
        "val/kl": evaluation["val/kl"],
        **{key: evaluation[key] for key in EMA_VAL_KEYS if key in evaluation},
        "best/val_loss": state.best_loss,
        "best/epoch": state.best_epoch,
        "wall_time_s": wall_time,
        "num_processes": accelerator.num_processes,
        "param_checksum_per_rank": checksums,
        "run_dir": str(cfg.run_dir),
        "stopped_early": state.stops_early(cfg.train.early_stop_patience),
        "weights": "ema" if loop.ema is not None else "trained",  # what last.pt and best.pt hold
        "startup_s": loop.startup.seconds(),  # this start's, before its first step (a resume's own)
        "wandb_start_wait_s": loop.tracker.start_wait_s,  # the loop's wait for W&B's start (in epoch 1's end)
    }
    if accelerator.is_main_process:
        if cfg.log.figures:
            drawn = drawn or _draw(loop, evaluation)
            figures.save_figures({"loss.png": figures.loss_curve(history), **drawn}, cfg.run_dir)
        checkpoint.atomic_write_text(cfg.run_dir / "summary.json", json.dumps(final, indent=1))
        hidden = ("param_checksum_per_rank", "run_dir", "stopped_early", "weights", "startup_s", "wandb_start_wait_s")
        shown = {k: v for k, v in final.items() if k not in hidden}
        loop.console.summary_table(f"{cfg.run_dir}: done", shown)
        loop.tracker.summary({**{k: v for k, v in shown.items() if k not in ("train/loss", "val/loss")},
                              "train/epoch_loss": final["train/loss"],
                              "train_time_s": sum(row["epoch_time_s"] for row in history)})  # over all restarts
    accelerator.wait_for_everyone()
    loop.tracker.end_training()  # accelerator.end_training(), a W&B failure there made a warning
    return final
