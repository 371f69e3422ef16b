"""train/* between epochs, every log.every_steps steps: the progress bar's loss, the finiteness check and W&B's
train/* points, per image over all processes' images since the last report."""

from __future__ import annotations

import time

import torch

from .step import stop_if_not_finite


class ProgressReport:
    """train/* every log.every_steps steps: per image over all processes' images since the last report."""

    def __init__(self, loop, sums: torch.Tensor, seen: int):  # loop: vae.training.loop.Loop
        self.loop, self.sums = loop, sums
        self.reported, self.reported_seen, self.reported_at = sums.clone(), seen, time.perf_counter()

    def report(self, epoch: int, step: int, seen: int, bar) -> None:
        # One all-reduce: every rank reaches the same verdict (none waits alone).
        window = torch.cat((self.sums - self.reported, self.sums.new_tensor([seen - self.reported_seen])))
        recon_sum, kl_sum, images = self.loop.accelerator.reduce(window, reduction="sum").tolist()
        if not images:  # every step since the last report was skipped (train.skip_nonfinite)
            return
        now = time.perf_counter()
        current = (recon_sum + kl_sum) / images
        stop_if_not_finite(current, epoch, step)
        bar.show_loss(current)
        if self.loop.tracker is not None:
            self.loop.tracker.log({"train/loss": current, "train/recon": recon_sum / images,
                                   "train/kl": kl_sum / images, "train/lr": self.loop.train_step.lr,
                                   "train/samples_per_s": images / max(now - self.reported_at, 1e-9),
                                   **self.loop.train_step.objective.logged(step)}, step=step)
        self.reported, self.reported_seen, self.reported_at = self.sums.clone(), seen, now
