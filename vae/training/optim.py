"""Adam, in the two forms the training step uses: torch's fused Adam for eager steps, and `FlatAdam` inside the CUDA
graph (train.cuda_graph), where torch's kernels leave most of a large GPU idle.

torch's fused and foreach Adam give each 65,536-element chunk of the parameters one thread block (kChunkSize, fixed
when torch is built): this model's 0.63 M parameters run on about 18 blocks of a 132-SM H200, 74.5 us of a 238 us
graph step for an update that moves 18 MB. FlatAdam keeps the parameters, Adam's moments and a copy of the gradients
as views into one flat buffer each and updates them with plain elementwise kernels, which spread over the whole GPU
(512 elements a block). Its arithmetic is torch.optim.Adam's capturable path, op for op, so it is Adam (a test
compares 200 steps), and it saves and loads torch.optim.Adam's state_dict: a run moves between the eager and the
graph step in either direction, and states saved by earlier versions load.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import HarnessError


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, cuda_graph: bool,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Adam:
    """Under a CUDA graph: FlatAdam, capturable, with the learning rate in a float64 device tensor (a float would be
    baked into the captured kernels and a schedule would not reach them; float64 as torch's float rate). Else fused
    Adam (one kernel for all)."""
    if cuda_graph:
        keep_state_dict_tensors_apart(model)
        return FlatAdam(model.parameters(), lr=torch.tensor(lr, dtype=torch.float64, device=device), betas=betas,
                        eps=eps)
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, fused=device.type in ("cuda", "cpu"))


def restore_step_settings(optimizer, device: torch.device) -> None:
    """A loaded optimizer state brings the settings of the run that saved it (capturable or fused, a float or a
    tensor learning rate): a state saved by an eager run resumed under a CUDA graph, or the reverse, gets this
    run's settings back, at the saved learning rate."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    flat = isinstance(inner, FlatAdam)
    for group in inner.param_groups:
        lr = float(group["lr"])
        group.update(capturable=flat, foreach=None, fused=None if flat else device.type in ("cuda", "cpu"))
        group["lr"] = torch.tensor(lr, dtype=torch.float64, device=device) if flat else lr


@dataclasses.dataclass
class _FlatGroup:
    """One parameter group as flat buffers; each parameter and its Adam state are views into them."""

    params: list[torch.nn.Parameter]
    numels: list[int]
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # float32 on the device, as capturable Adam keeps it: no host read per update

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [view.view_as(p) for view, p in zip(flat.split(self.numels), self.params, strict=True)]


class FlatAdam(torch.optim.Adam):
    """Adam over flat buffers (see the module's docstring). Gradients are gathered into one buffer by one kernel
    at each update, so autograd may allocate them as it likes (inside a CUDA graph: once, at the capture)."""

    def __init__(self, params, lr: float | torch.Tensor, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps, capturable=True)
        self._flat = [self._flatten(group["params"]) for group in self.param_groups]

    def _flatten(self, params: list[torch.nn.Parameter]) -> _FlatGroup:
        if len({(p.device, p.dtype) for p in params}) != 1:
            raise HarnessError("FlatAdam needs all parameters of a group on one device in one dtype")
        param = torch.cat([p.detach().reshape(-1) for p in params])
        flat = _FlatGroup(params, [p.numel() for p in params], param, torch.zeros_like(param),
                          torch.zeros_like(param), torch.zeros_like(param),
                          torch.zeros((), dtype=torch.float32, device=param.device))
        for p, view in zip(params, flat.views(flat.param), strict=True):
            p.data = view
        self._point_state_at(flat)
        return flat

    def _point_state_at(self, flat: _FlatGroup) -> None:
        moments = zip(flat.params, flat.views(flat.exp_avg), flat.views(flat.exp_avg_sq), strict=True)
        for p, exp_avg, exp_avg_sq in moments:
            self.state[p] = {"step": flat.step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, flat in zip(self.param_groups, self._flat, strict=True):
            self._gather_gradients(flat)
            _adam_update(flat, group["lr"], *group["betas"], group["eps"])
        return loss

    def _gather_gradients(self, flat: _FlatGroup) -> None:
        grads = [p.grad for p in flat.params]
        if any(g is None for g in grads):
            raise HarnessError("a parameter got no gradient in this step; FlatAdam (the CUDA-graph step) updates "
                               "all parameters together: set train.cuda_graph=false for a model with unused "
                               "parameters")
        self._rejoin_moved_parameters(flat)
        torch.cat([g.reshape(-1) for g in grads], out=flat.grad)

    @staticmethod
    def _rejoin_moved_parameters(flat: _FlatGroup) -> None:
        """A parameter given new storage since (module.to() to another dtype or device, a load that replaced it)
        would no longer be updated: its values go back into the buffer, and it becomes a view again. A host-side
        check of a few pointers, only in eager steps (a replayed graph does not run Python)."""
        for p, view in zip(flat.params, flat.views(flat.param), strict=True):
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view

    def state_dict(self) -> dict:
        # Every parameter gets its own tensors, as torch.optim.Adam keeps them: the shared step tensor, loaded into
        # torch's Adam, would be incremented once per parameter at each update.
        saved = super().state_dict()
        saved["state"] = {index: {key: value.clone() for key, value in state.items()}
                          for index, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Adam's state_dict (from this class or torch's Adam, eager or fused): the loaded values are
        copied into the flat buffers, and the state points into them again."""
        super().load_state_dict(state_dict)
        for flat in self._flat:
            loaded = [self.state.get(p, {}) for p in flat.params]
            for name in ("exp_avg", "exp_avg_sq"):
                for view, state in zip(flat.views(getattr(flat, name)), loaded, strict=True):
                    if name in state:
                        view.copy_(state[name])
                    else:  # a state saved before this parameter's first update
                        view.zero_()
            steps = [float(state["step"]) for state in loaded if "step" in state]
            flat.step.fill_(max(steps, default=0.0))  # one count for all: torch's Adam steps all parameters alike
            self._point_state_at(flat)


def _adam_update(flat: _FlatGroup, lr: float | torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """torch.optim.Adam's single-tensor update (torch/optim/adam.py), op for op and rounding for rounding, on the
    whole buffer at once, with the step count and the rate on the device. Its factors are computed in float64 as
    torch computes them on the host; addcdiv_'s factor must be a number, so the step size multiplies the first
    moment first (the order torch's addcdiv kernel evaluates value * t1 / t2 in)."""
    flat.step += 1
    flat.exp_avg.lerp_(flat.grad, 1 - beta1)
    flat.exp_avg_sq.mul_(beta2).addcmul_(flat.grad, flat.grad, value=1 - beta2)
    step = flat.step.double()
    step_size_neg = -lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    denom = (flat.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    flat.param.addcdiv_(flat.exp_avg * step_size_neg, denom)


def keep_state_dict_tensors_apart(model: torch.nn.Module) -> None:
    """The model's state_dict gives each parameter its own memory, not a view into FlatAdam's buffer: safetensors
    (Accelerate's checkpoint format) takes tensors that share memory for tied weights and keeps only the first."""

    def own_memory(module, state_dict, prefix, local_metadata) -> None:
        for key, value in state_dict.items():
            if isinstance(value, torch.nn.Parameter) or not isinstance(value, torch.Tensor):
                continue  # state_dict(keep_vars=True) asks for the parameters themselves
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                state_dict[key] = value.clone()

    model.register_state_dict_post_hook(own_memory)
