#!/bin/bash
# One run of a W&B sweep per array task: `wandb agent --count 1 SWEEP_ID` on one GPU.
#
#   wandb sweep configs/sweeps/z_dim.yaml                          # on the login node: prints the sweep id
#   sbatch --array=0-3 slurm/wandb_agent.sh <entity>/<project>/<id>   # 4 runs, one per task
#   sbatch --array=0-19%4 slurm/wandb_agent.sh <entity>/<project>/<id>  # 20 runs, at most 4 at a time
#
# W&B Sweeps need the W&B server: the nodes must reach it (WANDB_MODE=online, a `wandb login` or WANDB_API_KEY).
# Offline sweeps are impossible (wandb #7642); without internet on the nodes, use slurm/sweep.sh and
# `python -m vae.report`. Each run trains into runs/<config name>-sweep-<sweep id>/<W&B run id>. A run stopped by
# the time limit is not resumed by the agent (it hands out new runs): give the tasks the time one run needs.
#
# Edit these to your cluster (options given to sbatch on the command line win over these lines):
#SBATCH --job-name=vae-agent
#SBATCH --output=slurm-%x-%A_%a.out    # %A array job id, %a task
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1                   # one GPU (CPU-only partitions: sbatch --gres=none ...)
#SBATCH --mem=4G
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
##SBATCH --partition=gpu               # (two #: off) partition, account ...

# ----- settings: environment variables, defaults below (set them before sbatch: `VAE_X=... sbatch ...`) -----
# Settings are named VAE_*: sbatch passes the whole environment to the job, and a CONFIG or VENV of your own
# must not change what it runs. The repository: VAE_REPO, else the directory you ran sbatch from.
VAE_REPO=${VAE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$VAE_REPO/train.py" || ! -f "$VAE_REPO/slurm/common.sh" ]]; then
  echo "error: $VAE_REPO is not the harness's repository (no train.py and slurm/common.sh there): submit from the repository's root, or set VAE_REPO=/path/to/the/repository" >&2
  exit 1
fi
# The Python environment to activate; VAE_VENV= (empty) uses whatever python/wandb is on PATH (modules, conda).
VENV=${VAE_VENV-"$VAE_REPO/.venv"}
# ---------------------------------------------------------------------------------------------------------

set -uo pipefail
cd "$VAE_REPO" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh || exit 1
export PYTHONUNBUFFERED=1

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: sbatch --array=0-N slurm/wandb_agent.sh <entity>/<project>/<sweep id> (from: wandb sweep configs/sweeps/...)" >&2
  exit 2
fi
mode=$(tr '[:upper:]' '[:lower:]' <<<"${WANDB_MODE:-online}")
if [[ "$mode" == offline || "$mode" == dryrun || "$mode" == disabled ]]; then
  echo "error: WANDB_MODE=$WANDB_MODE: W&B sweeps need the W&B server (offline sweeps are impossible, wandb #7642); unset WANDB_MODE on nodes that reach it, or use slurm/sweep.sh" >&2
  exit 2
fi
activate_venv
echo "=== W&B sweep agent | job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} | sweep $1 | $(date '+%F %T')"
exec wandb agent --count 1 "$1"
