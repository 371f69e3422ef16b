# Shared by the Slurm scripts (sourced, not submitted). Slurm runs a copy of the submitted script from its spool
# directory, so the scripts find the repository first (VAE_REPO, else the directory sbatch ran in) and source
# this file from there.

# Activate $VENV (VAE_VENV) unless it is empty (then the python on PATH is used: modules, conda).
activate_venv() {
  [[ -z "$VENV" ]] && return 0
  if [[ ! -f "$VENV/bin/activate" ]]; then
    echo "error: no Python environment at VAE_VENV=$VENV (make venv creates .venv; VAE_VENV= uses the python on PATH)" >&2
    exit 1
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
}

# The scripts' arguments, [CONFIG] [section.key=value ...]: a first argument without '=' is the config file (it
# replaces CONFIG); sets the array `overrides` (with run.dir=$RUN_DIR first when VAE_RUN_DIR is set).
take_config_and_overrides() {
  if [[ $# -gt 0 && "$1" != *=* ]]; then
    CONFIG=$1
    shift
  fi
  overrides=()
  [[ -n "$RUN_DIR" ]] && overrides+=("run.dir=$RUN_DIR")
  overrides+=("$@")
}

# The run directory as the harness will resolve it from CONFIG and the overrides given; this also stops a bad
# config here, in one line.
resolve_run_dir() {
  python - "$CONFIG" "$@" <<'PY'
import sys
try:
    from vae.config import load_config
    from vae.errors import HarnessError
except Exception as e:  # an older/newer harness: just do not show it
    print("?"); sys.exit(0)
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run_dir.resolve())
except HarnessError as e:
    print(f"error: {e}", file=sys.stderr); sys.exit(2)
PY
}

# GPUs Slurm gave this job on this node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES; nvidia-smi where Slurm does
# not manage GPUs); 0 without any.
gpus_in_allocation() {
  if [[ -n "${SLURM_JOB_ID:-}" ]] && job_gpus_per_node; then
    return 0
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Inside a job: its own GPUs per node, asked of Slurm (prints them; fails where scontrol cannot say). Not from
# SLURM_GPUS_ON_NODE or CUDA_VISIBLE_DEVICES: sbatch passes the submitting shell's environment on, so a job
# submitted from inside a GPU allocation sees that allocation's values even with --gres=none.
job_gpus_per_node() {
  local info
  info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 1
  [[ -n "$info" ]] || return 1
  if [[ $info =~ TresPerNode=[^[:space:]]*gpu[:=]([0-9]+) ]]; then  # --gres=gpu:N, --gpus-per-node=N
    echo "${BASH_REMATCH[1]}"
  elif [[ $info =~ [[:space:]]TRES=[^[:space:]]*gres/gpu=([0-9]+) ]]; then  # --gpus=N: the job's total
    local total=${BASH_REMATCH[1]} nodes=1
    [[ $info =~ NumNodes=([0-9]+) ]] && nodes=${BASH_REMATCH[1]}
    echo $(( total / nodes ))
  else
    echo 0
  fi
}

# Sets GPUS_PER_NODE (the user's VAE_GPUS_PER_NODE, else the allocation's) and checks it.
settle_gpus_per_node() {
  GPUS_PER_NODE=${GPUS_PER_NODE:-$(gpus_in_allocation)}
  if ! [[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]]; then
    echo "error: VAE_GPUS_PER_NODE must be a whole number (got '$GPUS_PER_NODE')" >&2
    exit 1
  fi
}

# Waits for the background job $1 and sets rc to its exit code. `wait` returns early whenever a trapped signal
# arrives; wait again until the job is really gone.
wait_for() {
  while true; do
    wait "$1"
    rc=$?
    kill -0 "$1" 2>/dev/null || break
  done
}

# The run directory's newest requested stop, in words (what the harness recorded in starts.jsonl): why this start
# of the job exists.
previous_stop() {
  python -c 'import sys; from vae.cluster.preemption import previous_stop; print(previous_stop(sys.argv[1]))' "$1" 2>/dev/null \
    || echo "? (an older harness)"
}
