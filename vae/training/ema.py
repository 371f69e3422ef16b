"""train.ema_decay: an exponential moving average (EMA) of the trained weights, kept beside them.

After update t, ema = d * ema + (1 - d) * weights with d = min(train.ema_decay, (1 + t) / (10 + t)): the warm-up of
TensorFlow's ExponentialMovingAverage, so that the first epochs' average is not mostly the random initial weights
(at 0.999 the warm-up lasts about 9,000 updates). One fused lerp over all parameters on their device, as timm's
ModelEmaV3 does; torch's AveragedModel would compare a step-count tensor on every update, a device sync per step on
a GPU, where this never reads anything back. The average is part of every full state (ema.safetensors, written and read
by Accelerate's save/load hooks: a resumed run goes on with the same average), it is scored on the test set beside
the trained weights (val_ema/*), and it is what last.pt and best.pt hold when on. Tensors only: Accelerate's own
way for extra objects (register_for_checkpointing) unpickles custom_checkpoint_0.pkl with weights_only=False, so
a pickle planted in a run directory would run its code when the run resumed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import HarnessError

WARMUP = 10  # d = (1 + t) / (WARMUP + t) until that reaches train.ema_decay
EMA_FILE = "ema.safetensors"  # in each full state: the averaged weights; its metadata, the update count
LEGACY_FILE = "custom_checkpoint_0.pkl"  # where earlier versions kept it (Accelerate's register_for_checkpointing)


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

    # Accelerate's save_state / load_state call these before their own files (register_*_state_pre_hook).
    def save_into(self, directory: str | Path) -> None:
        weights = {name: tensor.detach().contiguous() for name, tensor in self.module.state_dict().items()}
        save_file(weights, str(Path(directory) / EMA_FILE), metadata={"updates": str(self.updates)})

    def load_from(self, directory: str | Path) -> None:
        path = Path(directory) / EMA_FILE
        if not path.is_file() and (Path(directory) / LEGACY_FILE).is_file():
            self._convert_legacy(Path(directory))
        if not path.is_file():
            raise HarnessError(f"{directory} holds no {EMA_FILE}: it was saved without train.ema_decay")
        with safe_open(str(path), framework="pt", device="cpu") as tensors:
            weights = {name: tensors.get_tensor(name) for name in tensors.keys()}
            updates = int((tensors.metadata() or {}).get("updates", "0"))
        self.module.load_state_dict(weights)
        self.updates = updates

    def _convert_legacy(self, directory: Path) -> None:
        """A state saved by an earlier version: its average becomes ema.safetensors, and the pickle is renamed
        (Accelerate counts custom_checkpoint_*.pkl files against the objects registered with it: none now)."""
        state = _legacy_state(directory / LEGACY_FILE)
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
        self.save_into(directory)
        os.replace(directory / LEGACY_FILE, directory / f"{LEGACY_FILE}.converted")


def _legacy_state(path: Path) -> dict:
    """The average as earlier versions saved it through Accelerate ({"weights": tensors, "updates": int}), read
    with weights_only=True: tensors and plain values only, never code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and isinstance(state.get("weights"), dict) and "updates" in state):
        raise HarnessError(f"{path} is not the average of the weights an earlier version saved")
    return state


def weight_average(model: torch.nn.Module, decay: float | None, accelerator) -> WeightAverage | None:
    """The run's EMA of `model` (the plain module, not a DDP or compiled wrapper), saved with every full state;
    None when train.ema_decay is off."""
    if decay is None:
        return None
    average = WeightAverage(model, decay)

    def save(models, weights, directory) -> None:
        if accelerator.is_main_process:  # the same average on every process: one file
            average.save_into(directory)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(lambda models, directory: average.load_from(directory))
    return average
