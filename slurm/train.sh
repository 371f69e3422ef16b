#!/bin/bash
# Train the VAE on ONE node of a Slurm cluster: one process per GPU of the allocation (DDP), or one CPU process.
# It asks for one GPU: a 0.6 M-parameter model trains fastest on one (its step is ~60 small kernels, which a
# batch split over N GPUs does not shorten, and DDP adds an all-reduce per step; see docs/slurm.md).
#
#   sbatch slurm/train.sh                                         # configs/z2.yaml, 1 GPU
#   sbatch slurm/train.sh configs/z20.yaml train.epochs=50        # [CONFIG] [section.key=value ...]
#   sbatch --gres=gpu:4 slurm/train.sh configs/z20.yaml           # 4 GPUs of one node, 4 processes (DDP)
#   VAE_GPUS_PER_NODE=0 sbatch --gres=none slurm/train.sh configs/debug.yaml   # CPU-only partitions
#   VAE_RUN_DIR=runs/z20-long sbatch slurm/train.sh configs/z20.yaml  # another run directory
#
# Preemption and time limits: 180 s before the end Slurm sends SIGUSR1 to this script, which passes it to the
# training processes; they finish the current step, write a full checkpoint (mid-epoch), finish the W&B run and
# requeue the job, whose next start resumes exactly there (same run directory). `scontrol requeue`, `scancel`
# and the time limit send SIGTERM: a checkpoint is written too, and a requeued job resumes from it.
# SIGUSR2 works the same: `sbatch --signal=B:USR2@180 slurm/train.sh` where USR1 goes missing (some NCCL
# versions' proxy thread takes USR1 for itself, NVIDIA/nccl#704; submitit uses USR2 for that reason).
# Several nodes: slurm/train_multinode.sh. Several configs as one job array: slurm/sweep.sh.
#
# Edit these to your cluster (options given to sbatch on the command line win over these lines):
#SBATCH --job-name=vae
#SBATCH --output=slurm-%x-%j.out       # %x job name, %j job id; in the directory you ran sbatch from
#SBATCH --open-mode=append             # a requeued job appends to its output file instead of wiping it
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1            # one launcher; it starts one process per GPU
#SBATCH --gres=gpu:1                   # one GPU (more: sbatch --gres=gpu:N; CPU-only partitions: --gres=none)
#SBATCH --mem=4G                       # the dataset is 55 MB: a few GB are plenty
#SBATCH --cpus-per-task=2              # CPUs for the launcher and the data (more with sbatch -c N)
#SBATCH --time=02:00:00
#SBATCH --requeue                      # may be requeued (preemption, node failure, the USR1 below)
#SBATCH --signal=B:USR1@180            # SIGUSR1 to this script 180 s (up to 60 s more) before the time limit
                                       # (USR2 is taken alike: sbatch --signal=B:USR2@180 ...)
##SBATCH --partition=gpu               # (two #: off) your GPU partition, account, QOS ...
##SBATCH --account=myproject

# ----- settings: environment variables, defaults below (set them before sbatch: `VAE_X=... sbatch ...`) -----
# Settings are named VAE_*: sbatch passes the whole environment to the job, and a CONFIG or VENV of your own
# must not change what it runs. The repository: VAE_REPO, else the directory you ran sbatch from.
VAE_REPO=${VAE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$VAE_REPO/train.py" || ! -f "$VAE_REPO/slurm/common.sh" ]]; then
  echo "error: $VAE_REPO is not the harness's repository (no train.py and slurm/common.sh there): submit from the repository's root, or set VAE_REPO=/path/to/the/repository" >&2
  exit 1
fi
# Config when none is given as the first argument.
CONFIG=${VAE_CONFIG:-configs/z2.yaml}
# Processes per node = GPUs per node. Unset: the GPUs Slurm gave this job (SLURM_GPUS_ON_NODE,
# CUDA_VISIBLE_DEVICES; nvidia-smi where Slurm does not manage GPUs). 0: one process on the CPU.
GPUS_PER_NODE=${VAE_GPUS_PER_NODE:-}
# Run directory (becomes run.dir=...). Unset: the harness's runs/<config name>. A requeued job must train into
# the same directory to resume, so it is fixed here, not derived from the job id.
RUN_DIR=${VAE_RUN_DIR:-}
# Weights & Biases: offline (compute nodes often have no internet; `wandb sync` later), online, or disabled.
export WANDB_MODE=${WANDB_MODE:-offline}
# The Python environment to activate; VAE_VENV= (empty) uses whatever python/accelerate is on PATH (modules, conda).
VENV=${VAE_VENV-"$VAE_REPO/.venv"}
# ---------------------------------------------------------------------------------------------------------

set -uo pipefail
cd "$VAE_REPO" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh || exit 1
export PYTHONUNBUFFERED=1  # lines reach slurm-*.out as they are printed

activate_venv

if (( ${SLURM_NNODES:-1} > 1 )); then
  echo "error: slurm/train.sh runs on one node; for $SLURM_NNODES nodes use slurm/train_multinode.sh" >&2
  exit 1
fi

take_config_and_overrides "$@"  # sets CONFIG and overrides

run_dir=$(resolve_run_dir "${overrides[@]}") || exit 2
# Array tasks (sbatch --array=... slurm/train.sh) must not share one run directory: one per task unless given.
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" && -z "$RUN_DIR" && " ${overrides[*]} " != *" run.dir="* ]]; then
  run_dir="${run_dir}-task${SLURM_ARRAY_TASK_ID}"
  overrides=("run.dir=$run_dir" "${overrides[@]}")
fi

settle_gpus_per_node

# Two multi-GPU jobs on one node must not meet on one rendezvous port: derive it from the job id.
port=$(( 20000 + ${SLURM_JOB_ID:-0} % 10000 ))
# One process runs python itself: accelerate's one-process launcher would turn the harness's exit codes (130,
# 138, 140, 143: stopped by a signal, resumable) into 1 or a traceback, and sacct would show that instead.
# --mixed_precision no only sets the default: train.mixed_precision=bf16 (or fp16) in the config still wins.
if (( GPUS_PER_NODE > 1 )); then
  procs=$GPUS_PER_NODE
  # vae.cluster.launcher is `accelerate launch` keeping the workers' exit code after a planned stop (not 1 and a traceback)
  launch=(python -m vae.cluster.launcher --num_machines 1 --mixed_precision no --dynamo_backend no
          --multi_gpu --num_processes "$procs" --main_process_port "$port")
  how="$procs processes, one per GPU (DDP)"
elif (( GPUS_PER_NODE == 1 )); then
  procs=1
  launch=(python)
  how="1 process on 1 GPU"
else
  procs=1
  launch=(python)
  overrides+=("train.cpu=true")
  how="1 process on the CPU"
fi
launch+=(train.py --config "$CONFIG" "${overrides[@]}")
# Threads per process: the node's CPUs shared out (unless set already).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$(nproc)} / procs > 0 ? ${SLURM_CPUS_ON_NODE:-$(nproc)} / procs : 1 ))}

echo "=== VAE training | job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} | start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) | $(date '+%F %T')"
echo "nodes:      1 (${SLURM_JOB_NODELIST:-$(hostname -s)})"
echo "processes:  $how; OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "config:     $CONFIG ${overrides[*]}"
echo "run dir:    $run_dir"
echo "restarts:   ${SLURM_RESTART_COUNT:-0}; previous stop: $(previous_stop "$run_dir")"
echo "python:     $(command -v python) | WANDB_MODE=$WANDB_MODE"
echo "command:    ${launch[*]}"
echo "==="

# The launch runs in the background so that this shell can take Slurm's signals while it waits; it starts with
# USR1, USR2 and TERM ignored (set in the subshell, inherited through exec) until the harness installs its
# handlers, once training starts. One process: the launch is python train.py, signalled directly. Several:
# torchrun's agent would handle TERM itself (forward it, then kill the workers 30 s later, then end in a
# traceback); its signal list without SIGTERM (PET_SIGNALS_TO_HANDLE, torch >= 2.6; TORCHELASTIC_SIGNALS_TO_HANDLE
# before) keeps it ignoring TERM, so the agent outlives its workers while they checkpoint. USR1/USR2 are passed
# to the workers (its children) from here. (scancel and a requeue also send TERM to every process of the job
# themselves; the harness counts TERMs that arrive within 2 s of each other as one.)
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
( trap '' USR1 USR2 TERM; exec "${launch[@]}" ) &
launcher=$!
# shellcheck disable=SC2329  # called from the traps below
forward() {
  echo "$(date '+%F %T') slurm/train.sh: got SIG$1; passing it to the training processes (checkpoint, then exit)"
  if (( procs > 1 )); then
    pkill "-$1" -P "$launcher" || true  # the launcher's children: the python train.py processes
  else
    kill "-$1" "$launcher" 2>/dev/null || true  # python train.py itself
  fi
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'forward TERM' TERM
wait_for "$launcher"  # sets rc
echo "$(date '+%F %T') slurm/train.sh: training exited with code $rc"
exit "$rc"
