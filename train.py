"""Train the MNIST VAE.

    accelerate launch train.py --config configs/z2.yaml [section.key=value ...]

Everything else (defaults, what each key means) is in vae/config.py and docs/configuration.md.
"""


from vae.config import load_config
from vae.console import OneLineArgumentParser
from vae.errors import exit_now, run_entry_point


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description="Train a VAE on MNIST (CPU, GPU, DDP) through Accelerate.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/z2.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides applied after the YAML, e.g. train.epochs=5 model.z_dim=10")
    args = parser.parse_args(argv)

    def train_run() -> None:
        cfg = load_config(args.config, args.overrides)  # before torch is imported: a config error answers at once
        from vae.training.loop import train

        train(cfg)

    # checkpoints are atomic: a second Ctrl-C leaves the last complete one intact
    return run_entry_point(train_run, "the last complete checkpoint is intact, run the same command to resume")


if __name__ == "__main__":
    exit_now(main())
