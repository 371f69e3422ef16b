"""Train the parity matrix's runs one after another in one process group, as `accelerate launch` started it:
for each batch, one epoch of configs/debug.yaml on the first <images> training images into <root>/b<batch>.
A batch is a size (50) or a size and a number of accumulated batches (25x2). Each run directory also gets
allreduces.json: how many gradient all-reduces DDP ran (0 with one process).

    accelerate launch --multi_gpu --num_processes N tests/scripts/parity_runs.py <root> <data root> <images> 50 25x2
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import PartialState
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from vae.config import load_config
from vae.training.loop import train

allreduces = 0


def counting_allreduce(state, bucket):
    """DDP's own all-reduce (divide by the world size, sum), counted."""
    global allreduces
    allreduces += 1
    return allreduce_hook(state, bucket)


def prepare_model_counting_allreduces(self, model, *args, **kwargs):
    model = prepare_model(self, model, *args, **kwargs)
    if isinstance(model, DistributedDataParallel):
        model.register_comm_hook(None, counting_allreduce)
    return model


if __name__ == "__main__":
    # train() ends with accelerator.end_training(), which destroys the process group; the runs here share one
    # (a second rendezvous on torchrun's store can hang), so it stays up until the script exits.
    PartialState.destroy_process_group = lambda self, group=None: None
    prepare_model, Accelerator.prepare_model = Accelerator.prepare_model, prepare_model_counting_allreduces
    root, data_root, images, *batches = sys.argv[1:]
    for batch in batches:
        size, _, accumulated = batch.partition("x")
        train(load_config("configs/debug.yaml", [
            f"run.dir={root}/b{batch}", f"data.root={data_root}", f"train.batch_size={size}",
            f"train.grad_accum_steps={accumulated or 1}", f"data.train_subset={images}", "train.cpu=true",
            "train.dist_backend=gloo", "log.wandb=false", "log.figures=false", "log.every_steps=7"]))
        if PartialState().is_main_process:
            (Path(root) / f"b{batch}" / "allreduces.json").write_text(json.dumps(allreduces))
        allreduces = 0
