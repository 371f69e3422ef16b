"""Train the parity matrix's runs one after another in one process group, as `accelerate launch` started it:
for each batch size, one epoch of configs/debug.yaml on the first <images> training images into
<root>/b<batch size>.

    accelerate launch --multi_gpu --num_processes N tests/scripts/parity_runs.py <root> <data root> <images> 50 64
"""

import sys

from accelerate.state import PartialState

from vae.config import load_config
from vae.training import train

if __name__ == "__main__":
    # train() ends with accelerator.end_training(), which destroys the process group; the runs here share one
    # (a second rendezvous on torchrun's store can hang), so it stays up until the script exits.
    PartialState.destroy_process_group = lambda self, group=None: None
    root, data_root, images, *batch_sizes = sys.argv[1:]
    for batch_size in batch_sizes:
        train(load_config("configs/debug.yaml", [
            f"run.dir={root}/b{batch_size}", f"data.root={data_root}", f"train.batch_size={batch_size}",
            f"data.train_subset={images}", "train.cpu=true", "log.wandb=false", "log.figures=false",
            "log.every_steps=7"]))
