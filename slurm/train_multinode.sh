#!/bin/bash
# Train the VAE as ONE data-parallel run across several nodes: one launcher per node (srun), one process per GPU.
#
#   sbatch --nodes=2 slurm/train_multinode.sh configs/z20.yaml          # 2 nodes x their GPUs
#   sbatch --nodes=4 slurm/train_multinode.sh configs/z20.yaml train.epochs=50
#   VAE_GPUS_PER_NODE=0 sbatch --nodes=2 slurm/train_multinode.sh configs/debug.yaml   # CPU nodes: gloo, 1 per node
#
# Every node runs `accelerate launch --multi_gpu --num_machines N --machine_rank <its SLURM_NODEID> ...`; the
# rank is read on that node (accelerate's own Slurm example passes none, which crashes with >1 GPU per node).
# The processes meet at the first node of the allocation, on a port derived from the job id.
# Preemption works as in slurm/train.sh: SIGUSR1 to this script is passed through srun to every node, all
# processes stop at the same step, checkpoint, and the job is requeued; its next start resumes there.
#
# Edit these to your cluster (options given to sbatch on the command line win over these lines):
#SBATCH --job-name=vae-multinode
#SBATCH --output=slurm-%x-%j.out       # %x job name, %j job id; in the directory you ran sbatch from
#SBATCH --open-mode=append             # a requeued job appends to its output file instead of wiping it
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one launcher per node; it starts one process per GPU
#SBATCH --exclusive                    # whole nodes: every GPU and CPU of each
#SBATCH --mem=0                        # and all their memory
#SBATCH --cpus-per-task=2              # at least this many CPUs per node (--exclusive gives all anyway)
#SBATCH --time=04:00:00
#SBATCH --requeue                      # may be requeued (preemption, node failure, the USR1 below)
#SBATCH --signal=B:USR1@180            # SIGUSR1 to this script 180 s (up to 60 s more) before the time limit
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
CONFIG=${VAE_CONFIG:-configs/z20.yaml}
# Processes per node = GPUs per node (the same on every node). Unset: the GPUs Slurm gave this job on the first
# node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES; nvidia-smi where Slurm does not manage GPUs).
# 0: CPU nodes, one process per node, DDP over gloo.
GPUS_PER_NODE=${VAE_GPUS_PER_NODE:-}
# Run directory (becomes run.dir=...) on a file system every node sees. Unset: the harness's
# runs/<config name>. A requeued job must train into the same directory to resume.
RUN_DIR=${VAE_RUN_DIR:-}
# Weights & Biases: offline (compute nodes often have no internet; `wandb sync` later), online, or disabled.
export WANDB_MODE=${WANDB_MODE:-offline}
# The Python environment to activate; VAE_VENV= (empty) uses whatever python/accelerate is on PATH (modules, conda).
VENV=${VAE_VENV-"$VAE_REPO/.venv"}
# Address the other nodes reach the first node at. Unset: its Slurm NodeAddr, resolved to an IPv4 address.
MAIN_PROCESS_IP=${VAE_MAIN_PROCESS_IP:-}
# ---------------------------------------------------------------------------------------------------------

set -uo pipefail
cd "$VAE_REPO" || exit 1
# shellcheck source=slurm/common.sh
source slurm/common.sh || exit 1
if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
  echo "error: slurm/train_multinode.sh needs a Slurm allocation: sbatch --nodes=2 slurm/train_multinode.sh ..." >&2
  exit 1
fi
export PYTHONUNBUFFERED=1  # lines reach slurm-*.out as they are printed

activate_venv  # srun passes the environment on: every node uses this env

take_config_and_overrides "$@"  # sets CONFIG and overrides

run_dir=$(resolve_run_dir "${overrides[@]}") || exit 2

settle_gpus_per_node
nodes=${SLURM_NNODES:-1}
if (( GPUS_PER_NODE > 0 )); then
  per_node=$GPUS_PER_NODE
  how="$per_node per node, one per GPU (DDP over NCCL)"
else
  per_node=1
  overrides+=("train.cpu=true")  # without it each CPU process would believe it is alone (the harness stops)
  how="1 per node, on the CPU (DDP over gloo)"
fi
total=$(( nodes * per_node ))

# The rendezvous: the first node of the allocation, at its address; a port from the job id, so that two jobs
# sharing a node do not collide.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [[ -z "$MAIN_PROCESS_IP" ]]; then
  head_addr=$(scontrol show node "$head_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  head_addr=${head_addr:-$head_node}
  MAIN_PROCESS_IP=$(getent ahostsv4 "$head_addr" 2>/dev/null | awk 'NR == 1 { print $1 }')
  MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$head_addr}
fi
port=$(( 20000 + ${SLURM_JOB_ID:-0} % 10000 ))

# CPUs per node for the launcher's step: the smallest count Slurm gave any node (SLURM_JOB_CPUS_PER_NODE is
# like "64(x2),32"). Slurm 22.05's srun no longer inherits --cpus-per-task from sbatch, so it is passed.
cpus_per_node=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-1}" | sed 's/(.*//' | sort -n | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus_per_node / per_node > 0 ? cpus_per_node / per_node : 1 ))}

# --mixed_precision no only sets the default: train.mixed_precision=bf16 (or fp16) in the config still wins.
launcher_opts=(--multi_gpu --num_machines "$nodes" --num_processes "$total"
               --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$port"
               --mixed_precision no --dynamo_backend no)
script=(train.py --config "$CONFIG" "${overrides[@]}")

echo "=== VAE training, multi-node | job ${SLURM_JOB_ID:-?} | start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) | $(date '+%F %T')"
echo "nodes:      $nodes (${SLURM_JOB_NODELIST:-?}); rendezvous $head_node = $MAIN_PROCESS_IP:$port"
echo "processes:  $total: $how; OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo "config:     $CONFIG ${overrides[*]}"
echo "run dir:    $run_dir"
echo "restarts:   ${SLURM_RESTART_COUNT:-0}; previous stop: $(previous_stop "$run_dir")"
echo "python:     $(command -v python) | WANDB_MODE=$WANDB_MODE"
echo "command:    srun --nodes=$nodes --ntasks-per-node=1 python -m vae.cluster.launcher --machine_rank \$SLURM_NODEID ${launcher_opts[*]} ${script[*]}"
echo "==="

export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
# One task per node. Inside the single quotes $SLURM_NODEID is read on each node, by that node's shell, so each
# launcher gets its own machine rank. The arguments come after `bash -c '...' node` as "$@", unquoted nowhere.
# The launcher is `accelerate launch` run by vae.cluster.launcher, which keeps the workers' exit code after a planned
# stop (instead of 1 and a traceback). It ignores USR1, USR2 and TERM (set before exec, inherited, and TERM
# left out of torchrun's signal list): when srun passes a signal on, Slurm signals EVERY process of the step,
# and the launcher must outlive its training processes, which catch it, checkpoint and exit.
# shellcheck disable=SC2016  # the single quotes are the point: expanded on each node
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus_per_node" --kill-on-bad-exit=1 \
  bash -c 'trap "" USR1 USR2 TERM
           echo "node $SLURM_NODEID ($(hostname -s)): python -m vae.cluster.launcher --machine_rank $SLURM_NODEID"
           exec python -m vae.cluster.launcher --machine_rank "$SLURM_NODEID" "$@"' node "${launcher_opts[@]}" "${script[@]}" &
step=$!
# shellcheck disable=SC2329  # called from the traps below
forward() {
  echo "$(date '+%F %T') slurm/train_multinode.sh: got SIG$1; passing it to every node (checkpoint, then exit)"
  kill "-$1" "$step" 2>/dev/null || true  # srun passes it on to all processes of the step, on every node
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'forward TERM' TERM
wait_for "$step"  # sets rc
echo "$(date '+%F %T') slurm/train_multinode.sh: training exited with code $rc"
exit "$rc"
