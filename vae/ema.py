"""train.ema_decay: an exponential moving average (EMA) of the trained weights, kept beside them.

After update t, ema = d * ema + (1 - d) * weights with d = min(train.ema_decay, (1 + t) / (10 + t)): the warm-up of
TensorFlow's ExponentialMovingAverage, so that the first epochs' average is not mostly the random initial weights
(at 0.999 the warm-up lasts about 9,000 updates). One fused lerp over all parameters on their device, as timm's
ModelEmaV3 does; torch's AveragedModel would compare a step-count tensor on every update, a device sync per step on
a GPU, where this never reads anything back. The average is part of every full state (registered with
Accelerate's checkpointing: a resumed run goes on with the same average), it is scored on the test set beside the
trained weights (val_ema/*), and it is what last.pt and best.pt hold when on.
"""

from __future__ import annotations

import copy

import torch

WARMUP = 10  # d = (1 + t) / (WARMUP + t) until that reaches train.ema_decay


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._averaged = list(self.module.parameters())
        self._trained = list(model.parameters())  # the same tensors all run long: updated in place

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, self.updates / (WARMUP - 1 + self.updates))
        torch._foreach_lerp_(self._averaged, self._trained, 1.0 - decay)

    # Accelerate's save_state / load_state call these for objects registered for checkpointing.
    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def weight_average(model: torch.nn.Module, decay: float | None, accelerator) -> WeightAverage | None:
    """The run's EMA of `model` (the plain module, not a DDP or compiled wrapper), saved with every full state;
    None when train.ema_decay is off."""
    if decay is None:
        return None
    average = WeightAverage(model, decay)
    accelerator.register_for_checkpointing(average)
    return average
