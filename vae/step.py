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

from .config import TrainConfig
from .console import RunConsole
from .data import to_unit_float
from .errors import TrainingError
from .model import negative_elbo_terms
from .optim import make_optimizer

# Eager steps run on a side stream before the graph is captured, as torch.cuda.graphs asks: they initialise
# Adam's state, cuBLAS workspaces and autocast, and they are real steps of the run (their updates count).
GRAPH_WARMUP_STEPS = 3


def prepare_optimization(raw_model, train: TrainConfig, accelerator: Accelerator, total_steps: int,
                         cuda_graph: bool):
    """The model, Adam and, with train.lr_schedule=cosine, its schedule, prepared by Accelerate together: (model,
    optimizer, scheduler or None). The schedule is built on Adam itself, as Accelerate expects: torch's schedulers
    watch the step of the optimizer they are given, and TrainStep calls Adam's step directly, so a schedule built on
    Accelerate's wrapper would warn at its first step that it came before any optimizer step."""
    optimizer = make_optimizer(raw_model, train.lr, accelerator.device, cuda_graph)
    if train.lr_schedule != "cosine":
        return (*accelerator.prepare(raw_model, optimizer), None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return accelerator.prepare(raw_model, optimizer, scheduler)


class TrainStep:
    """Eager steps. `__call__` returns False when the step was skipped for a non-finite loss (train.skip_nonfinite
    above 0: the only case that checks the loss every step, at the cost of one sync)."""

    def __init__(self, model, optimizer, accelerator: Accelerator, images: torch.Tensor, z_dim: int,
                 guard_nonfinite: bool = False, accum_steps: int = 1):
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.images, self.z_dim, self.guard_nonfinite = images, z_dim, guard_nonfinite
        self.world, self.accum_steps = accelerator.num_processes, accum_steps
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

    def __call__(self, indices: torch.Tensor, global_size: int, share: tuple[int, int]) -> bool:
        noise = torch.randn(global_size, self.z_dim, device=self.accelerator.device)[share[0]: share[1]]
        self.inner_optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_update(indices, noise)

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
        x = to_unit_float(self.images[indices].to(self.accelerator.device))  # a no-op with data.on_device
        logits, mu, logvar = self.model(x, noise)
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
        # The tutorial's objective: -ELBO summed over the GLOBAL batch. DDP averages gradients over the N
        # processes, so each scales the sum over its share by N; accelerate's backward divides by the
        # accumulation steps, which the sum must not be.
        loss = (recon + kl).sum() * (self.world * self.accum_steps)
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

    def __call__(self, indices: torch.Tensor, global_size: int, share: tuple[int, int]) -> bool:
        key = (global_size, *share)
        if self.graph is not None and key == self.graph_key:
            self.static_indices.copy_(indices)
            torch.randn(global_size, self.z_dim, device=self.accelerator.device, out=self.static_noise)
            self.graph.replay()
            return True
        if self.graph is None and self.eager_steps >= GRAPH_WARMUP_STEPS and global_size == self.full_batch:
            self._capture(key, len(indices))
            return self(indices, global_size, share)
        return self._eager(indices, global_size, share)

    def _eager(self, indices: torch.Tensor, global_size: int, share: tuple[int, int]) -> bool:
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            noise = torch.randn(global_size, self.z_dim, device=self.accelerator.device)[share[0]: share[1]]
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
        self.static_noise = torch.zeros(global_size, self.z_dim, device=device)
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
