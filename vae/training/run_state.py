"""Where a run stands: its counters as one object, saved as trainer_state.json with every full checkpoint
(vae.storage.checkpoint) and read back when the run resumes.

A state saved at the end of an epoch says "start epoch e at batch 0"; one saved when a stop arrived mid-epoch says
"epoch e, after `batches_done` batches", and carries what that epoch had summed so far (over all processes) and
the settings that decide its batches, so the resumed epoch reports the loss of all its images. EpochResult is what
one pass over an epoch's batches did (vae.training.loop.train_one_epoch).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EpochSoFar:
    """The sums of an epoch stopped part-way, over all processes' images."""

    loss_sum: float = 0.0  # summed -ELBO of the images trained so far in the epoch
    seen: int = 0  # how many images that is
    batch_order: dict = dataclasses.field(default_factory=dict)  # vae.training.resume.batch_order_settings when saved
    train_seconds: float = 0.0  # the epoch's training time before the stop


@dataclasses.dataclass
class RunState:
    epoch: int = 1  # the epoch to train (next, or on with when stopped mid-epoch)
    step: int = 0  # optimizer steps since the run began, over all its starts
    batches_done: int = 0  # batches of `epoch` already trained
    best_loss: float = math.inf  # the lowest val/loss so far (val_ema/loss with an EMA), and its epoch
    best_epoch: int | None = None
    so_far: EpochSoFar = dataclasses.field(default_factory=EpochSoFar)
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics.jsonl rows (kept there, not here)

    @property
    def mid_epoch(self) -> bool:
        return self.batches_done > 0

    def trainer_state(self) -> dict:
        """What trainer_state.json holds (JSON: plain numbers, strings and containers)."""
        state = {"epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
                 # no best yet: null, not Infinity, which strict JSON readers (jq) refuse
                 "best": {"val/loss": self.best_loss if math.isfinite(self.best_loss) else None,
                          "epoch": self.best_epoch}}
        if self.mid_epoch:
            state["epoch_so_far"] = dataclasses.asdict(self.so_far)
        return state

    @classmethod
    def from_trainer_state(cls, state: dict, history: list[dict] | None = None) -> RunState:
        best = state.get("best") or {}
        best_loss = best.get("val/loss")
        # "partial": the same sums under their name in states written before 2026-11
        so_far = state.get("epoch_so_far", state.get("partial")) or {}
        return cls(epoch=state["epoch"], step=state["step"], batches_done=state["batches_done"],
                   best_loss=math.inf if best_loss is None else float(best_loss), best_epoch=best.get("epoch"),
                   so_far=EpochSoFar(float(so_far.get("loss_sum", 0.0)), int(so_far.get("seen", 0)),
                                     dict(so_far.get("batch_order", {})), float(so_far.get("train_seconds", 0.0))),
                   history=list(history or []))

    def stopped_at(self, trained: EpochResult, batch_order: dict, train_seconds: float) -> None:
        """A stop arrived after `trained.batches_done` batches of the current epoch, `train_seconds` into it."""
        self.batches_done = trained.batches_done
        self.so_far = EpochSoFar(trained.loss_sum, trained.seen, batch_order, train_seconds)

    def epochs_without_improvement(self) -> int:
        """Finished epochs since the one with the best val/loss."""
        return self.epoch - 1 - self.best_epoch if self.best_epoch is not None else 0

    def stops_early(self, patience: int | None) -> bool:
        """train.early_stop_patience epochs in a row without a better val/loss (the same on every process: the
        test pass's val/loss is the all-process one)."""
        return patience is not None and self.epochs_without_improvement() >= patience

    def early_stop_reason(self, patience: int | None) -> str | None:
        if not self.stops_early(patience):
            return None
        return (f"stopped early after epoch {self.epoch - 1}: no better val/loss for "
                f"{self.epochs_without_improvement()} epochs (train.early_stop_patience={patience}; the best, "
                f"{self.best_loss:.3f}, at epoch {self.best_epoch})")

    def finish_epoch(self, row: dict) -> bool:
        """Record an epoch's metrics row and move on to the next epoch; True when the val/loss of the weights the
        run keeps (their average's, val_ema/loss, when train.ema_decay is on) is the best yet."""
        self.history.append(row)
        loss = row.get("val_ema/loss", row["val/loss"])
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = loss, row["epoch"]
        self.epoch, self.batches_done, self.so_far = row["epoch"] + 1, 0, EpochSoFar()
        return improved


@dataclasses.dataclass
class EpochResult:
    """What train_one_epoch did, summed over all processes."""

    stopped: bool  # a stop was requested: the epoch ended after `batches_done` batches
    step: int
    batches_done: int
    loss_sum: float  # summed -ELBO of the epoch's images so far (including those before a mid-epoch resume)
    seen: int  # how many images that is
    trained_now: int = 0  # images trained by this start (fewer than seen when it resumed mid-epoch)
    per_rank: list[int] = dataclasses.field(default_factory=list)  # the same, per process
    data_wait_s: list[float] = dataclasses.field(default_factory=list)  # per process (vae.training.perf)
    peak_memory_mb: list[float] = dataclasses.field(default_factory=list)  # per process
    skipped: int = 0  # steps whose update was not applied (non-finite loss, fp16 overflow)

    @property
    def mean_loss(self) -> float:
        """nan when no image was trained (every step skipped as non-finite): the finiteness check stops the run."""
        return self.loss_sum / self.seen if self.seen else float("nan")
