#!/bin/bash
# A sweep as one job array: array task i trains SWEEP[i] (below) into its own run directory, on one GPU.
#
#   sbatch --array=0-2 slurm/sweep.sh                              # z_dim 2, 10, 20 on configs/z2.yaml
#   sbatch --array=0-2%2 slurm/sweep.sh                            # at most 2 tasks at a time
#   sbatch --array=0-2 slurm/sweep.sh configs/z20.yaml train.epochs=5   # [CONFIG] [overrides for every task]
#   VAE_GPUS_PER_NODE=0 sbatch --gres=none --array=0-2 slurm/sweep.sh configs/debug.yaml   # CPU-only partitions
#
# Task i runs slurm/train.sh with CONFIG, SWEEP[i]'s overrides and VAE_RUN_DIR=<VAE_SWEEP_DIR>/<name from them>
# (runs/z2-sweep/z_dim-10-<hash> for model.z_dim=10): the same directory after a requeue (so it resumes), another for
# each setting. Preemption, requeue and the output are as in slurm/train.sh.
#
# Edit these to your cluster (options given to sbatch on the command line win over these lines):
#SBATCH --job-name=vae-sweep
#SBATCH --output=slurm-%x-%A_%a.out    # %A array job id, %a task index; in the directory you ran sbatch from
#SBATCH --open-mode=append             # a requeued task appends to its output file instead of wiping it
#SBATCH --array=0-2                    # one task per SWEEP entry; `sbatch --array=...` overrides this
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1                   # one GPU per task (CPU-only partitions: sbatch --gres=none ...)
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
#SBATCH --requeue                      # may be requeued (preemption, node failure, the USR1 below)
#SBATCH --signal=B:USR1@180            # SIGUSR1 to the script 180 s (up to 60 s more) before the time limit
##SBATCH --mem=16G                     # (two #: off) memory, partition, account ...
##SBATCH --partition=gpu

# ----- settings: environment variables, defaults below (set them before sbatch: `VAE_X=... sbatch ...`) -----
# Settings are named VAE_*: sbatch passes the whole environment to the job, and a CONFIG or VENV of your own
# must not change what it runs. The repository: VAE_REPO, else the directory you ran sbatch from.
VAE_REPO=${VAE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$VAE_REPO/train.py" || ! -f "$VAE_REPO/slurm/common.sh" ]]; then
  echo "error: $VAE_REPO is not the harness's repository (no train.py and slurm/common.sh there): submit from the repository's root, or set VAE_REPO=/path/to/the/repository" >&2
  exit 1
fi
# The config every task starts from, when none is given as the first argument.
SWEEP_CONFIG=${VAE_SWEEP_CONFIG:-configs/z2.yaml}
# The sweep: one entry per array task, each a space-separated list of section.key=value overrides.
SWEEP=(
  "model.z_dim=2"
  "model.z_dim=10"
  "model.z_dim=20"
)
# ...or from the environment, entries separated by ';':  VAE_SWEEP_LIST="model.z_dim=2;model.z_dim=5 train.lr=3e-4"
if [[ -n "${VAE_SWEEP_LIST:-}" ]]; then IFS=';' read -r -a SWEEP <<<"$VAE_SWEEP_LIST"; fi
# Where the tasks' run directories go. Unset: runs/<config name>-sweep.
SWEEP_DIR=${VAE_SWEEP_DIR:-}
# VAE_GPUS_PER_NODE, WANDB_MODE, VAE_VENV: as in slurm/train.sh, which runs each task.
# ---------------------------------------------------------------------------------------------------------

set -uo pipefail
cd "$VAE_REPO" || exit 1

if [[ $# -gt 0 && "$1" != *=* ]]; then
  SWEEP_CONFIG=$1
  shift
fi
task=${SLURM_ARRAY_TASK_ID:-}
if [[ -z "$task" ]]; then
  echo "error: slurm/sweep.sh is a job array: sbatch --array=0-$(( ${#SWEEP[@]} - 1 )) slurm/sweep.sh" >&2
  exit 1
fi
if (( task >= ${#SWEEP[@]} )); then
  echo "error: array task $task, but the sweep has ${#SWEEP[@]} entries (use --array=0-$(( ${#SWEEP[@]} - 1 )))" >&2
  exit 1
fi
# The entry's overrides: split at spaces, except where the next word does not start a new section.key=...
# ("model.hidden=[512, 512] train.lr=3e-4" is two overrides).
setting=()
read -r -a words <<<"${SWEEP[$task]}"
for word in "${words[@]}"; do
  if [[ ${#setting[@]} -eq 0 || "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z0-9_.]+= ]]; then
    setting+=("$word")
  else
    setting[-1]+=" $word"
  fi
done

# The run directory is named after the setting, not after the task index or job id: a requeued task finds its
# run again, and editing the list does not hand an old run to another setting. A readable part
# (model.z_dim=10 train.lr=3e-4 -> z_dim-10_lr-3e-4), then 8 hex digits of a hash of all that makes the run what
# it is: the config file, the setting's overrides in full and those given to every task. The readable part
# alone can be the same for two settings (run.name=x and log.name=x; log.group=a/b and a:b) or two sweeps
# (train.lr=1e-3 and 1e-4 given to every task; configs/other/z2.yaml): they never share a run directory.
name=""
for override in "${setting[@]}"; do
  key=${override%%=*}
  value=${override#*=}
  name+="${name:+_}${key##*.}-${value}"
done
name=$(tr -d ' []' <<<"${name:-task$task}" | tr -c 'A-Za-z0-9._+=,\n-' '_')  # hidden-[512, 512] -> hidden-512,512
config_file=$(realpath -m --relative-to="$VAE_REPO" "$SWEEP_CONFIG")
name+="-$(printf '%s\0' "$config_file" "${setting[@]}" -- "$@" | sha256sum | cut -c1-8)"
config_name=$(basename "${SWEEP_CONFIG%.*}")
export VAE_RUN_DIR="${SWEEP_DIR:-runs/${config_name}-sweep}/$name"

echo "=== sweep task $task of ${#SWEEP[@]} (array job ${SLURM_ARRAY_JOB_ID:-?}): ${setting[*]} -> $VAE_RUN_DIR"
# exec: slurm/train.sh becomes this job's shell, so it is what Slurm's USR1 (--signal=B:...) reaches.
exec bash "$VAE_REPO/slurm/train.sh" "$SWEEP_CONFIG" "${setting[@]}" "$@"
