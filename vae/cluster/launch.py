"""The Accelerator and the launch checks that train.py and evaluate.py share: the launches that would start N
processes each believing it is alone, and what a run records about where it ran.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, GradientAccumulationPlugin, GradScalerKwargs, InitProcessGroupKwargs

from .. import tracking
from ..config import Config, ConfigError
from ..console import RunConsole
from ..errors import HarnessError
from ..tracking import tensorboard_backend as tensorboard_tracking


class LaunchError(HarnessError):
    """The processes were started in a way that cannot train (or evaluate) as one job."""


FP16_MAX = 65504.0


def fp16_initial_scale(global_batch: int) -> float:
    """GradScaler's first loss scale for fp16. Its default, 65536, is made for losses averaged over a batch; this
    loss is summed over the global batch, whose gradients grow with it (at initialisation the largest is about 3
    nats per image of the batch: 145 at batch 50), so 65536 overflows fp16 at once and the first steps are
    skipped until the scale has halved far enough. Start instead at the largest power of two that leaves those
    gradients 5x below fp16's maximum (64 at batch 50, 2 at batch 1024); the scaler still grows it as it likes."""
    return float(2 ** max(0, math.floor(math.log2(FP16_MAX / (16 * global_batch)))))


def make_deterministic() -> None:
    """What torch needs for a reproducible GPU run; before any CUDA work (cuBLAS reads its variable once)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def determinism() -> dict:
    """The settings environment.json records."""
    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def make_accelerator(cfg: Config) -> Accelerator:
    if "tensorboard" in cfg.log.active_trackers:
        tensorboard_tracking.require()  # a missing package is an error before anything starts
    if cfg.train.deterministic:
        make_deterministic()
    handlers = [GradScalerKwargs(init_scale=fp16_initial_scale(cfg.train.batch_size))]  # used only under fp16
    if cfg.train.cuda_graph is not False:
        # A CUDA graph cannot hold autocast's weight cache. Off for auto too, decided before the device is known:
        # each weight is used once per forward here, so the cache saves nothing and changes no number.
        handlers.append(AutocastKwargs(cache_enabled=False))
    # Taken only where the process group is made: by this Accelerator (no PartialState exists before it).
    handlers += process_group_handlers(cfg.train.dist_backend, cfg.train.dist_timeout_s)
    return Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,  # None: the launcher's --mixed_precision / config file
        # The loop steps the schedule once per global batch, applied or skipped (Accelerate's default would step
        # it N times per batch with N processes, and not at all after a skipped fp16 update).
        step_scheduler_with_optimizer=False,
        # From the config alone: a plugin keeps ACCELERATE_GRADIENT_ACCUMULATION_STEPS (a DeepSpeed launch setting)
        # from changing what accelerate's backward divides by behind the step's back.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.grad_accum_steps),
        kwargs_handlers=handlers,
        # None without W&B: wandb is never imported (TensorBoard is registered by vae.tracking, see there)
        log_with=tracking.log_with("wandb" in cfg.log.active_trackers),
    )


def process_group_handlers(backend: str, timeout_s: float | None) -> list:
    """Accelerate's settings of the process group, for train.dist_backend / --dist-backend and
    train.dist_timeout_s. A backend only where a group will be made: Accelerate 1.16 given one for a single
    process takes it as distributed and fails ("Default process group has not been initialized")."""
    settings = {}
    if timeout_s is not None:
        settings["timeout"] = timedelta(seconds=timeout_s)
    if backend != "auto" and _launched_as_several():
        settings["backend"] = backend
    return [InitProcessGroupKwargs(**settings)] if settings else []


def _launched_as_several() -> bool:
    """What Accelerate reads to decide a launch is distributed (torchrun's LOCAL_RANK, or a world size)."""
    if os.environ.get("LOCAL_RANK", "-1") != "-1":
        return True
    return any(int(os.environ.get(name, "1") or 1) > 1
               for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))


# Launchers that start N copies of a script without the torch.distributed variables Accelerate reads: each copy
# would believe it is process 0 of 1. (srun inside a job step, mpirun / Intel MPI / MPICH.)
FOREIGN_LAUNCHERS = (("SLURM_STEP_NUM_TASKS", "srun"), ("OMPI_COMM_WORLD_SIZE", "mpirun"), ("PMI_SIZE", "mpirun"))


def _launcher_process_count() -> tuple[int, str]:
    """How many processes the user asked the launcher for, as far as this process can tell, and by what."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return world, "accelerate launch"
    for variable, launcher in FOREIGN_LAUNCHERS:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return int(value), launcher
    # `accelerate launch --cpu --num_processes 2` starts one process and sets nothing that says 2; the
    # launcher's own command line (our parent process) still does.
    args, _ = _launcher_args_and_env()
    if "launch" not in args:
        return 1, ""
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(args) and args[i + 1].isdigit():
                return int(args[i + 1]), "accelerate launch"
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return (int(value), "accelerate launch") if value.isdigit() else (1, "")
    return 1, ""


def _launcher_args_and_env() -> tuple[list[str], dict[str, str]]:
    """The parent process's command line and the environment it started with (/proc keeps the initial one)."""
    parent = Path(f"/proc/{os.getppid()}")
    try:
        args = [a.decode(errors="replace") for a in (parent / "cmdline").read_bytes().split(b"\0")]
        env = dict(item.decode(errors="replace").partition("=")[::2]
                   for item in (parent / "environ").read_bytes().split(b"\0") if item)
    except OSError:
        return [], {}
    return args, env


def cpu_threads(cfg: Config, accelerator: Accelerator) -> int | None:
    """Torch's CPU threads for this process: train.num_threads when set. Else, for training on the CPU under
    `accelerate launch`, which gives every process OMP_NUM_THREADS=1 unless told otherwise (its default for GPU
    training, where the CPU only feeds the GPU), this process's share of the machine's cores: one thread on a CPU
    run trains at about 0.8x of two on a 2-core machine. None: leave torch as it is (OMP_NUM_THREADS or
    --num_cpu_threads_per_process set by the user, a GPU run, or no launcher)."""
    if cfg.train.num_threads:
        return cfg.train.num_threads
    if accelerator.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    args, launcher_env = _launcher_args_and_env()
    chosen_by_user = "OMP_NUM_THREADS" in launcher_env or any(
        a.startswith(("--num_cpu_threads_per_process", "--num-cpu-threads-per-process")) for a in args)
    if "launch" not in args or chosen_by_user:
        return None
    import psutil  # an accelerate dependency

    usable = len(os.sched_getaffinity(0))
    cores = min(usable, psutil.cpu_count(logical=False) or usable)
    on_this_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // on_this_node)


def check_processes(accelerator: Accelerator, cpu: bool, script: str) -> None:
    """Stop a launch whose N processes would each run alone (train.py and evaluate.py alike)."""
    requested, launcher = _launcher_process_count()
    if requested <= 1 or accelerator.num_processes > 1:
        return
    if launcher != "accelerate launch":
        fix = (f"start one `accelerate launch --multi_gpu --num_processes N {script} ...` per node instead (as "
               f"slurm/train.sh and slurm/train_multinode.sh do)")
    elif torch.cuda.is_available() and not cpu:
        fix = "launch with --multi_gpu and one GPU per process"
    else:
        flag = "train.cpu=true" if script == "train.py" else "--cpu"
        fix = (f"on CPU use: accelerate launch --multi_gpu --num_processes N {script} ... {flag} "
               f"(the --cpu launcher flag starts a single process)")
    raise LaunchError(f"launched as {requested} processes but Accelerate sees only one ({launcher} started them), "
                      f"so each would run alone; {fix}")


def check_backend(accelerator: Accelerator, backend_setting: str, key: str) -> None:
    """NCCL needs GPUs and refuses two processes on one ("Duplicate GPU detected", at the first collective, deep
    in the run): say so before anything starts. gloo lets them share it, through the host."""
    if backend_setting == "nccl" and accelerator.device.type != "cuda":
        raise ConfigError(f"{key}: nccl needs CUDA GPUs (this run is on {accelerator.device}); use gloo or auto")
    on_this_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    gpus = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
    if accelerator.num_processes > 1 and accelerator.state.backend == "nccl" and on_this_node > gpus:
        raise LaunchError(f"{on_this_node} processes share {gpus} GPU(s) on this node and NCCL refuses two processes "
                          f"on one GPU; start at most {gpus} per node, or set {key}=gloo to share a GPU (slower: "
                          f"gradients go through the host)")


def check_training_launch(cfg: Config, accelerator: Accelerator, console: RunConsole) -> StepChoice:
    """The launch checks of train.py; returns the training step this run uses (train.cuda_graph)."""
    check_processes(accelerator, cfg.train.cpu, "train.py")
    check_backend(accelerator, cfg.train.dist_backend, "train.dist_backend")
    if accelerator.num_processes > cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} images per step cannot be shared by "
                          f"{accelerator.num_processes} processes; raise train.batch_size to at least "
                          f"{accelerator.num_processes} or start fewer processes")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        console.warn("fp16 mixed precision does nothing on CPU (Accelerate ignores it): training in fp32. "
                     "Use bf16 for mixed precision on CPU, or fp16 on a GPU.")
    use_tf32(cfg.train.tf32, accelerator.device, console)
    return choose_step(cfg, accelerator.device.type, accelerator.num_processes, accelerator.mixed_precision)


def use_tf32(wanted: bool, device: torch.device, console: RunConsole) -> None:
    """train.tf32 on a GPU, either way (a second train() in the same process must not inherit the first's)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if wanted else "highest")  # "high": TF32 matrix products
    elif wanted:
        console.warn(f"train.tf32 does nothing on {device.type}: training in full fp32")


@dataclass(frozen=True)
class StepChoice:
    """The training step a run uses (train.cuda_graph) and why, as its first line says."""

    cuda_graph: bool
    why: str

    def describe(self) -> str:
        return f"step: {'CUDA graph' if self.cuda_graph else 'eager'} ({self.why})"


def choose_step(cfg: Config, device_type: str, processes: int, mixed_precision: str) -> StepChoice:
    """train.cuda_graph replays one captured step: it needs CUDA, fixed work per step, and no host decision. auto
    takes it wherever it applies; true refuses, in one line, where it does not."""
    setting = cfg.train.cuda_graph
    if setting is False:
        return StepChoice(False, "train.cuda_graph=false")
    obstacles = [(short, why) for bad, short, why in _graph_obstacles(cfg, device_type, processes, mixed_precision)
                 if bad]
    if setting is True and obstacles:
        raise ConfigError(f"train.cuda_graph: {obstacles[0][1]}; set train.cuda_graph=false or change the launch")
    if obstacles:
        return StepChoice(False, f"auto: {obstacles[0][0]}")
    precision = "bf16" if mixed_precision == "bf16" else "fp32"
    return StepChoice(True, "train.cuda_graph=true" if setting is True else f"auto: one CUDA process, {precision}")


def _graph_obstacles(cfg: Config, device_type: str, processes: int, mixed_precision: str) -> list:
    """(applies, as auto says it, as true's error says it) for each reason the graph cannot run."""
    return [
        (device_type != "cuda", f"runs on {device_type}", f"needs a CUDA device (this run is on {device_type})"),
        (processes > 1, f"{processes} processes", f"runs on one process (this run has {processes})"),
        (mixed_precision == "fp16", "fp16",
         "does not support fp16 (its loss scaler decides on the host); use bf16"),
        (cfg.train.compile, "train.compile", "and train.compile are exclusive"),
        (cfg.data.on_device is False, "data.on_device=false",
         "needs the images on the GPU (data.on_device=false keeps them on the host)"),
        (cfg.train.skip_nonfinite > 0, "train.skip_nonfinite",
         "and train.skip_nonfinite (a per-step host check) are exclusive"),
        (cfg.train.grad_accum_steps > 1, "gradient accumulation",
         "and train.grad_accum_steps are exclusive (the graph holds one batch)"),
    ]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment_info(accelerator: Accelerator, step: StepChoice | None = None) -> dict:
    return {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),  # not imported: seconds of start-up for a version string
        "accelerate": accelerate.__version__,
        "host": platform.node(),
        "device": str(accelerator.device),
        "device_name": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else
        platform.processor() or platform.machine(),
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "dist_backend": accelerator.state.backend if accelerator.num_processes > 1 else None,
        "nccl_version": _nccl_version(),
        "mixed_precision": accelerator.mixed_precision,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "step": step.describe() if step is not None else None,
        "torch_threads": torch.get_num_threads(),
        "deterministic": determinism(),
    }


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
