"""Evaluate a trained VAE checkpoint on the test set of its dataset.

    python evaluate.py --ckpt runs/z2/last.pt
    python evaluate.py --ckpt runs/z2                  # a run directory: its best.pt, else last.pt
    python evaluate.py --ckpt runs/z2 --wandb          # also into the run's W&B run (offline without a login)
    accelerate launch --multi_gpu --num_processes 4 evaluate.py --ckpt runs/z20/best.pt --iwae-k 5000
"""


from vae.console import OneLineArgumentParser
from vae.errors import exit_now, run_entry_point


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description="Metrics and figures of a VAE checkpoint on its dataset's test set.")
    parser.add_argument("--ckpt", required=True, help="a .pt file (last.pt/best.pt) or a run directory")
    parser.add_argument("--iwae-k", type=int, default=100, help="importance samples per image for the IWAE bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image noise")
    parser.add_argument("--out", default=None, help="metrics JSON (default: <run dir>/eval/metrics.json)")
    parser.add_argument("--out-dir", default=None, help="figures folder (default: <run dir>/eval/)")
    parser.add_argument("--batch-size", type=int, default=500,
                        help="test images per batch, all processes (fewer where --iwae-k needs: memory stays bounded)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="score the first N test images only (default: all; a quick look, not a paper's number)")
    parser.add_argument("--data-root", default=None, help="MNIST root (default: the checkpoint's data.root)")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when a GPU is present")
    parser.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="process group backend with several processes (gloo: several processes on one GPU)")
    parser.add_argument("--fcd-samples", type=int, default=10_000,
                        help="prior samples scored by the Fréchet classifier distance (0: off)")
    parser.add_argument("--no-figures", action="store_true", help="metrics only")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the metrics and figures into the W&B run of the checkpoint's run directory")
    args = parser.parse_args(argv)

    def evaluation_run() -> None:
        from vae.evaluation.scoring import evaluate  # imported here so that --help and usage errors answer at once

        evaluate(args.ckpt, iwae_k=args.iwae_k, seed=args.seed, out=args.out, out_dir=args.out_dir,
                 batch_size=args.batch_size, cpu=args.cpu, data_root=args.data_root,
                 figures=not args.no_figures, wandb=args.wandb, dist_backend=args.dist_backend,
                 fcd_samples=args.fcd_samples, test_images=args.test_images)

    return run_entry_point(evaluation_run, "the checkpoint is only read, never changed: run the same command again")


if __name__ == "__main__":
    exit_now(main())
