"""The training step: one global batch's -ELBO, its gradient and Adam's update, run eagerly or replayed as one CUDA
graph (train.cuda_graph).

A step takes this process's image indices (a device tensor) and draws the N(0, I) noise of the whole GLOBAL batch
from the default generator, which every process seeds alike, then keeps its own share: 1 or N processes draw the
same noise for the same image, so they train the same model. Nothing in a step reads a value back to the host;
the recon and KL sums stay on the device until the loop asks for them (`sums`).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..config import Config, LossConfig, TrainConfig
from ..console import RunConsole
from ..datasets.batches import to_unit_float
from ..datasets.binarize import bernoulli_pixels
from ..errors import TrainingError
from ..models import objectives
from .optim import make_optimizer

# Eager steps run on a side stream before the graph is captured, as torch.cuda.graphs asks: they initialise
# Adam's state, cuBLAS workspaces and autocast, and they are real steps of the run (their updates count).
GRAPH_WARMUP_STEPS = 3


def prepare_optimization(raw_model, train: TrainConfig, accelerator: Accelerator, steps_per_epoch: int,
                         cuda_graph: bool):
    """The model, Adam and its schedule (train.lr_schedule), prepared by Accelerate together: (model, optimizer,
    scheduler or None for a constant rate). The schedule is built on Adam itself, as Accelerate expects: torch's
    schedulers watch the step of the optimizer they are given, and TrainStep calls Adam's step directly, so a
    schedule built on Accelerate's wrapper would warn at its first step that it came before any optimizer step."""
    optimizer = make_optimizer(raw_model, train.lr, accelerator.device, cuda_graph, tuple(train.adam_betas),
                               train.adam_eps)
    if train.lr_schedule == "constant":
        return (*accelerator.prepare(raw_model, optimizer), None)
    if train.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs * steps_per_epoch)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, IwaeStages(steps_per_epoch))
    return accelerator.prepare(raw_model, optimizer, scheduler)


class IwaeStages:
    """train.lr_schedule=iwae, as a factor of step: 10^(-i/7) in stage i, which lasts 3^i epochs (Burda et al.
    2015, section 5: i = 0..7, 3,280 epochs; later epochs stay in stage 7)."""

    LAST_STAGE = 7

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch

    @staticmethod
    def stage_of_epoch(epoch: int) -> int:
        """The stage of 1-based `epoch`: stage i ends with epoch 3^0 + ... + 3^i = (3^(i+1) - 1) / 2."""
        stage = 0
        while stage < IwaeStages.LAST_STAGE and epoch > (3 ** (stage + 1) - 1) // 2:
            stage += 1
        return stage

    def __call__(self, step: int) -> float:
        return 10 ** (-self.stage_of_epoch(step // self.steps_per_epoch + 1) / 7)


class TrainStep:
    """Eager steps. `__call__` returns False when the step was skipped for a non-finite loss (train.skip_nonfinite
    above 0: the only case that checks the loss every step, at the cost of one sync)."""

    def __init__(self, model, optimizer, accelerator: Accelerator, images: torch.Tensor, z_dim: int,
                 guard_nonfinite: bool = False, accum_steps: int = 1, objective: objectives.Objective | None = None,
                 binarize_seed: int | None = None):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.images, self.z_dim, self.guard_nonfinite = images, z_dim, guard_nonfinite
        self.world, self.accum_steps = accelerator.num_processes, accum_steps
        self.objective = objective or objectives.Objective(LossConfig(), accelerator.device)
        # The noise of one image: one draw for the ELBO, loss.iwae_k for the IWAE bound
        self.noise_shape = (z_dim,) if self.objective.samples == 1 else (self.objective.samples, z_dim)
        # data.binarize=dynamic: each image's pixels drawn afresh each epoch, from (seed, epoch, image, pixel) only;
        # the epoch lives on the device, as a captured graph must read it
        self.binarize_seed = binarize_seed
        self.epoch = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        # Accelerate's optimizer wrapper only adds host work here (no gradient accumulation): per call, step()
        # looks up an optional package (lomo_optim) with importlib twice and zero_grad() inspects a signature,
        # together more host time than the whole step's GPU work on an H200. Its inner optimizer is the object
        # it would call; only fp16's loss scaler needs the wrapper's step().
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.optimizer_step = optimizer.step if accelerator.scaler is not None else self.inner_optimizer.step
        # recon and KL summed over the images of the applied steps of this process (float64: an epoch of 60,000
        # images at ~150 nats must not lose the per-image digits)
        self.sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)

    @property
    def lr(self) -> float:
        return float(self.inner_optimizer.param_groups[0]["lr"])  # a device tensor under train.cuda_graph

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        self.epoch.fill_(epoch)

    def __call__(self, indices: torch.Tensor, global_size: int, share: tuple[int, int], step: int = 0) -> bool:
        """One update on this process's `indices` of a global batch of `global_size`; `step`: updates so far."""
        self.objective.at_step(step)
        noise = torch.randn(global_size, *self.noise_shape, device=self.accelerator.device)[share[0]: share[1]]
        self.inner_optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_update(indices, noise)

    def _pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """The batch as floats in [0, 1] on the device (a no-op move with data.on_device), binarized when asked."""
        images = self.images[indices].to(self.accelerator.device)
        if self.binarize_seed is None:
            return to_unit_float(images)
        return bernoulli_pixels(images, indices.to(self.accelerator.device), self.epoch, self.binarize_seed)

    def _forward_backward_update(self, indices: torch.Tensor, noise: torch.Tensor) -> bool:
        if self.accum_steps > 1:
            return self._accumulated_update(indices, noise)
        sums = self._forward_backward(indices, noise)
        if sums is None:
            return False
        self.optimizer_step()
        self.sums += sums
        return True

    def _forward_backward(self, indices: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
        """The gradient of these images' -ELBO, added to the parameters' .grad; their recon and KL sums, or None
        when the loss was not finite on some rank (train.skip_nonfinite)."""
        x = self._pixels(indices)
        logits, mu, logvar = self.model(x, noise)
        losses, recon, kl = self.objective.losses(x, logits, mu, logvar, noise)
        # The objective summed over the GLOBAL batch (the tutorial's: -ELBO). DDP averages gradients over the N
        # processes, so each scales the sum over its share by N; accelerate's backward divides by the
        # accumulation steps, which the sum must not be.
        loss = losses.sum() * (self.world * self.accum_steps)
        if self.guard_nonfinite and _not_finite_on_any_rank(loss, self.accelerator):
            return None  # every rank skips it: none enters backward, so none waits in DDP's all-reduce alone
        self.accelerator.backward(loss)
        return torch.stack((recon.detach().sum(), kl.detach().sum())).double()

    def _accumulated_update(self, indices: torch.Tensor, noise: torch.Tensor) -> bool:
        """train.grad_accum_steps: this process's share of the update's images in that many parts, one forward and
        backward each, through accelerate's accumulate() (DDP all-reduces on the last part only), then one update."""
        self.accelerator.step = 0  # every update counts its parts afresh: a skipped one never shifts the next
        total = torch.zeros_like(self.sums)
        parts = zip(indices.tensor_split(self.accum_steps), noise.tensor_split(self.accum_steps), strict=True)
        for part, part_noise in parts:
            with self.accelerator.accumulate(self.model):
                sums = self._forward_backward(part, part_noise)
            if sums is None:
                return False
            total += sums
        self.optimizer_step()
        self.sums += total
        return True


class GraphedTrainStep(TrainStep):
    """The same step, captured once as a CUDA graph and replayed: one launch instead of ~80 kernels' worth of
    Python and dispatch. A graph has fixed shapes, so batches of another size (the last, short batch of an epoch)
    run eagerly, on the same parameters, gradients and optimizer state. One process, fp32 or bf16 only (checked
    at launch)."""

    def __init__(self, *args, full_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_batch = full_batch  # captured at this global batch size: the short last batch stays eager
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_key: tuple[int, int, int] | None = None  # (global size, share) the graph was captured for
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream(device=self.accelerator.device)

    def __call__(self, indices: torch.Tensor, global_size: int, share: tuple[int, int], step: int = 0) -> bool:
        key = (global_size, *share)
        self.objective.at_step(step)
        if self.graph is not None and key == self.graph_key:
            self.static_indices.copy_(indices)
            torch.randn(global_size, *self.noise_shape, device=self.accelerator.device, out=self.static_noise)
            self.graph.replay()
            return True
        if self.graph is None and self.eager_steps >= GRAPH_WARMUP_STEPS and global_size == self.full_batch:
            self._capture(key, len(indices))
            return self(indices, global_size, share, step)
        return self._eager(indices, global_size, share)

    def _eager(self, indices: torch.Tensor, global_size: int, share: tuple[int, int]) -> bool:
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            noise = torch.randn(global_size, *self.noise_shape, device=self.accelerator.device)[share[0]: share[1]]
            # After the capture the gradients live in the graph's memory: zero them in place, never drop them.
            self.inner_optimizer.zero_grad(set_to_none=self.graph is None)
            self._forward_backward_update(indices, noise)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        self.eager_steps += 1
        return True

    def _capture(self, key: tuple[int, int, int], local_size: int) -> None:
        global_size, lo, hi = key
        device = self.accelerator.device
        self.static_indices = torch.zeros(local_size, dtype=torch.long, device=device)
        self.static_noise = torch.zeros(global_size, *self.noise_shape, device=device)
        torch.cuda.synchronize(device)
        self.inner_optimizer.zero_grad(set_to_none=True)  # backward inside the capture allocates the static gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward_backward_update(self.static_indices, self.static_noise[lo:hi])
        self.graph_key = key


def _not_finite_on_any_rank(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """One flag per step (a device sync, and an all-reduce under DDP: the price of train.skip_nonfinite)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() > 0)


def applied_updates(optimizer) -> int:
    """How many updates Adam has applied (its step count; one sync when it lives on the device)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    for state in inner.state.values():
        return int(state["step"]) if "step" in state else 0
    return 0


class NonFiniteSteps:
    """train.skip_nonfinite: how many training steps with a non-finite loss this start may skip (their update is
    not applied) before it stops. 0, the default, stops at the first periodic check that sees one."""

    def __init__(self, limit: int, console: RunConsole):
        self.limit, self.skipped, self.console = limit, 0, console

    def skip(self, epoch: int, step: int) -> None:
        self.skipped += 1
        if self.skipped > self.limit:
            raise TrainingError(f"training loss was not finite at epoch {epoch}, step {step}, more than "
                                f"train.skip_nonfinite={self.limit} times; the last good checkpoint is kept. Lower "
                                f"train.lr (or check the data) and re-run to resume from it")
        self.console.warn(f"training loss not finite at epoch {epoch}, step {step}: update skipped "
                          f"({self.skipped} of at most {self.limit}, train.skip_nonfinite)")


def stop_if_not_finite(value: float, epoch: int, step: int) -> None:
    """The training loss of a periodic check (or of the epoch): a non-finite one stops the run."""
    if value != value or value in (float("inf"), float("-inf")):
        raise TrainingError(f"training loss became {value} at epoch {epoch}, step {step}; the last good checkpoint "
                            f"is kept. Lower train.lr (or check the data) and re-run to resume from it")


def make_train_step(cuda_graph: bool, *args, full_batch: int, **kwargs) -> TrainStep:
    if cuda_graph:
        return GraphedTrainStep(*args, full_batch=full_batch, **kwargs)
    return TrainStep(*args, **kwargs)


def train_step_for(cfg: Config, cuda_graph: bool, model, optimizer, accelerator: Accelerator,
                   images: torch.Tensor) -> TrainStep:
    """The run's step, as its config asks: the graph or not, the objective (loss section), dynamic binarization,
    the non-finite guard, gradient accumulation."""
    return make_train_step(cuda_graph, model, optimizer, accelerator, images, cfg.model.z_dim,
                           full_batch=cfg.train.update_batch, guard_nonfinite=cfg.train.skip_nonfinite > 0,
                           accum_steps=cfg.train.grad_accum_steps,
                           objective=objectives.Objective(cfg.loss, accelerator.device),
                           binarize_seed=cfg.train.seed if cfg.data.binarize == "dynamic" else None)
