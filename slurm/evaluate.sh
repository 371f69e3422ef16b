#!/bin/bash
# Evaluate a trained run on the MNIST test set (metrics + figures), as a Slurm job on one GPU.
#
#   sbatch slurm/evaluate.sh runs/z20                        # a run directory: its best.pt, else last.pt
#   sbatch slurm/evaluate.sh runs/z20/last.pt --iwae-k 5000  # a checkpoint, and any evaluate.py options
#   sbatch --gres=none slurm/evaluate.sh runs/debug          # CPU-only partitions
#
# Writes <run dir>/eval/metrics.json and the figures (evaluate.py --help for the options).
#
# Edit these to your cluster (options given to sbatch on the command line win over these lines):
#SBATCH --job-name=vae-eval
#SBATCH --output=slurm-%x-%j.out       # %x job name, %j job id; in the directory you ran sbatch from
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1                   # one GPU (CPU-only partitions: sbatch --gres=none ...)
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue                      # an evaluation only writes its results at the end: rerunning is safe
##SBATCH --partition=gpu               # (two #: off) partition, account ...

# ----- settings: environment variables, defaults below (set them before sbatch: `VAE_X=... sbatch ...`) -----
# Settings are named VAE_*: sbatch passes the whole environment to the job, and a CONFIG or VENV of your own
# must not change what it runs. The repository: VAE_REPO, else the directory you ran sbatch from.
VAE_REPO=${VAE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$VAE_REPO/train.py" || ! -f "$VAE_REPO/slurm/common.sh" ]]; then
  echo "error: $VAE_REPO is not the harness's repository (no train.py and slurm/common.sh there): submit from the repository's root, or set VAE_REPO=/path/to/the/repository" >&2
  exit 1
fi
# The Python environment to activate; VAE_VENV= (empty) uses whatever python is on PATH (modules, conda).
VENV=${VAE_VENV-"$VAE_REPO/.venv"}
# ---------------------------------------------------------------------------------------------------------

set -uo pipefail
cd "$VAE_REPO" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh || exit 1
export PYTHONUNBUFFERED=1

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: sbatch slurm/evaluate.sh RUN_DIR_OR_CHECKPOINT [evaluate.py options]" >&2
  exit 2
fi
activate_venv
ckpt=$1
shift

echo "=== VAE evaluation | job ${SLURM_JOB_ID:-?} | $(date '+%F %T')"
echo "node:       ${SLURM_JOB_NODELIST:-$(hostname -s)}; GPUs: ${SLURM_GPUS_ON_NODE:-${CUDA_VISIBLE_DEVICES:-none}}"
echo "checkpoint: $ckpt"
echo "command:    python evaluate.py --ckpt $ckpt $*"
echo "==="
python evaluate.py --ckpt "$ckpt" "$@"
rc=$?
echo "$(date '+%F %T') slurm/evaluate.sh: evaluate.py exited with code $rc"
exit "$rc"
