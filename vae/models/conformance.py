"""The conformance check every model passes when it is built (vae.models.build_model), before any training: a
few forward passes on 3 images, on the device the model is on, that either pass or stop the run with one line
naming the broken rule and the fix (docs/models.md lists the rules).

It draws its inputs from a generator of its own and restores the global random state and the model's mode and
state afterwards, so building a model with or without the check leaves a run's numbers the same.
"""

from __future__ import annotations

import importlib
import math
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import HarnessError, first_line
from .protocol import ModelError

BATCH, SAMPLES = 3, 2  # images of the tiny batch; importance samples per image for the [B, k, z] rule
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # float32 rounding: a batch of 1 and of 3 may take other kernels
CHECK_SEED = 20_250_101  # any fixed value: every check sees the same images and noise
MEMBERS = ("from_config", "encode", "decode")
FIX = "docs/models.md"
_NOT_THE_MODEL = (str(Path(torch.__file__).parent), str(Path(importlib.__file__).parent), "<frozen")
_CALLERS = (__file__, str(Path(__file__).with_name("__init__.py")))  # the harness's frames that call the model


def check_class(cls: object, arch: str) -> None:
    """Before building: an nn.Module subclass with the members the harness calls."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"model.arch={arch}: {getattr(cls, '__name__', cls)!s} is not a torch.nn.Module "
                         f"subclass; subclass vae.models.GaussianVAE ({FIX})")
    missing = [name for name in MEMBERS if not callable(getattr(cls, name, None))]
    missing += ["forward"] if cls.forward is nn.Module.forward else []
    missing += sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ModelError(f"model.arch={arch}: {cls.__name__} does not follow the model protocol: it does not "
                         f"define {', '.join(missing)}; subclass vae.models.GaussianVAE and define encode and "
                         f"decode ({FIX})")


def where(error: BaseException) -> str:
    """' (at file.py:12)': the innermost frame of the error in the model's own code (not torch's, not importlib's,
    not the frames of the harness that called it); '' when there is none (a SyntaxError names its own line)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(_NOT_THE_MODEL) and f.filename not in _CALLERS]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}: ({', '.join(describe(v) for v in value)})"
    return type(value).__name__


def check_model(model: nn.Module, cfg: ModelConfig, image_shape: tuple[int, int, int],
                rebuild: Callable[[], nn.Module]) -> None:
    """Every rule of the contract on `model` (built for `cfg` and `image_shape`); `rebuild` makes a fresh instance
    for the state_dict round trip. Raises ModelError on the first rule broken."""
    rules = _Rules(model, cfg, image_shape)
    rules.members()
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else []
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    was_training = model.training
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        try:
            model.train()  # the mode of the training step: where BatchNorm would mix the images of a batch
            rules.inputs(device)
            rules.shapes()
            rules.sampling()
            rules.independence()
            rules.round_trip(rebuild, device)
        finally:
            model.load_state_dict(state)  # undo what the passes changed (running statistics, counters)
            model.train(was_training)


class _Rules:
    def __init__(self, model: nn.Module, cfg: ModelConfig, image_shape: tuple[int, int, int]):
        self.model, self.cfg, self.image_shape = model, cfg, tuple(image_shape)
        self.pixels, self.z = math.prod(self.image_shape), cfg.z_dim
        self.name = f"model.arch={cfg.arch}"

    def fail(self, rule: str, fix: str) -> ModelError:
        return ModelError(f"{self.name}: {rule}; {fix} ({FIX})")

    def call(self, what: str, function: Callable, *args):
        try:
            return function(*args)
        except HarnessError:
            raise
        except Exception as error:  # the model's own code failed: one line with where, not the traceback
            shapes = ", ".join(describe(a) for a in args)
            raise self.fail(f"{what} on {shapes} raised {first_line(error)}{where(error)}",
                            f"it must take x [B, {self.pixels}] and z [..., {self.z}]") from None

    def members(self) -> None:
        z_dim = getattr(self.model, "z_dim", None)
        if z_dim != self.z:
            raise self.fail(f"the model's z_dim is {z_dim!r}, the config's model.z_dim {self.z}",
                            "set self.z_dim = cfg.z_dim in __init__")
        shape = getattr(self.model, "image_shape", None)
        if shape is not None and tuple(shape) != self.image_shape:
            raise self.fail(f"the model's image_shape is {shape!r}, built for {self.image_shape}",
                            "keep the image_shape the model is built with")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise self.fail("the model has no trainable parameters",
                            "register its layers as attributes (nn.Module) or nn.Parameter")

    def inputs(self, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(CHECK_SEED)
        self.x = torch.rand(BATCH, self.pixels, generator=generator).to(device)
        self.noise = torch.randn(BATCH, self.z, generator=generator).to(device)
        self.noise_k = torch.randn(BATCH, SAMPLES, self.z, generator=generator).to(device)

    def expect(self, value, shape: tuple[int, ...], what: str, fix: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
            raise self.fail(f"{what} must be a floating-point tensor {list(shape)}, got {describe(value)}", fix)
        if not torch.isfinite(value).all():
            raise self.fail(f"{what} is not finite (nan or inf) on images in [0, 1] at initialisation",
                            "check the model's arithmetic (log of 0, division by 0, exp overflow)")
        return value

    def forward(self, x: torch.Tensor, noise: torch.Tensor, label: str):
        out = self.call(f"forward (x, noise {list(noise.shape)})", self.model, x, noise)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise self.fail(f"forward(x, noise) must return (logits, mu, logvar), got {describe(out)}",
                            "return the decoder's logits and the posterior's mu and logvar")
        logits, mu, logvar = out
        b = len(x)
        self.expect(logits, (b, *noise.shape[1:-1], self.pixels), f"forward's logits with noise {label}",
                    "decode every sample: z [..., z] -> logits [..., D], leading dimensions kept")
        for name, value in (("mu", mu), ("logvar", logvar)):
            self.expect(value, (b, self.z), f"forward's {name}", "return one (mu, logvar) per image")
        return logits, mu, logvar

    def shapes(self) -> None:
        """encode, decode and forward give the shapes, dtypes and finite values the harness works with."""
        encoded = self.call("encode", self.model.encode, self.x)
        if not isinstance(encoded, (tuple, list)) or len(encoded) != 2:
            raise self.fail(f"encode(x) must return (mu, logvar), got {describe(encoded)}",
                            f"return two tensors [B, {self.z}]")
        for name, value in zip(("mu", "logvar"), encoded, strict=True):
            self.expect(value, (BATCH, self.z), f"encode's {name}", f"return [B, {self.z}] per batch of B images")
        for z in (self.noise, self.noise_k):
            logits = self.call("decode", self.model.decode, z)
            self.expect(logits, (*z.shape[:-1], self.pixels), f"decode's logits for z {list(z.shape)}",
                        "decode z [..., z] to logits [..., D], keeping any leading dimensions")
        self.outputs = self.forward(self.x, self.noise, f"[B, z] = {list(self.noise.shape)}")
        self.forward(self.x, self.noise_k, f"[B, k, z] = {list(self.noise_k.shape)}")

    def sampling(self) -> None:
        """forward's randomness is the noise passed in: z = mu + noise * exp(logvar / 2), decoded."""
        again = self.forward(self.x, self.noise, "[B, z]")
        if not all(torch.allclose(a, b, **TOLERANCE) for a, b in zip(self.outputs, again, strict=True)):
            raise self.fail("two calls with the same images and noise gave different outputs: the model draws "
                            "random numbers of its own (dropout, torch.randn), which 1 and N processes draw "
                            "differently", "take all randomness from the noise argument")
        logits, mu, logvar = self.outputs
        expected = self.call("decode", self.model.decode, mu + self.noise * torch.exp(0.5 * logvar))
        if not torch.allclose(logits, expected, **TOLERANCE):
            raise self.fail(f"forward's logits are not decode(mu + noise * exp(logvar / 2)) (largest difference "
                            f"{(logits - expected).abs().max().item():.3g}), so the KL the loss computes from (mu, "
                            f"logvar) is not that of the sample decoded",
                            "sample z from the noise argument as vae.models.reparameterize does")

    def independence(self) -> None:
        """Image 0 alone gives what it gives inside a batch of 3 (N processes split a batch down to 1 image)."""
        fix = "remove what mixes the images (BatchNorm in training mode: use GroupNorm, LayerNorm or no normalisation)"
        try:
            self.model(self.x[:1], self.noise[:1])
        except HarnessError:
            raise
        except Exception as error:
            raise self.fail(f"forward on 1 image raised {first_line(error)}{where(error)}: the output for one image "
                            f"depends on the other images of the batch, and N processes split a batch down to 1 "
                            f"image each", fix) from None
        alone = self.forward(self.x[:1], self.noise[:1], "[1, z]")
        for name, single, batched in zip(("logits", "mu", "logvar"), alone, self.outputs, strict=True):
            if not torch.allclose(single[0], batched[0], **TOLERANCE):
                raise self.fail(
                    f"the {name} of an image alone differ from its {name} in a batch of {BATCH} (largest "
                    f"difference {(single[0] - batched[0]).abs().max().item():.3g}): the output for one image "
                    f"depends on the other images of the batch, so 1 and N processes would train different "
                    f"models", fix)

    def round_trip(self, rebuild: Callable[[], nn.Module], device: torch.device) -> None:
        """The weights as a model file holds them (float32 on the CPU) give a fresh instance the same outputs."""
        weights = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.model.state_dict().items()}
        fresh = rebuild().to(device).train()
        try:
            fresh.load_state_dict(weights)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            raise self.fail(f"its state_dict does not load into a fresh instance ({first_line(error)})",
                            "build the same modules from the same config every time") from None
        logits = self.call("forward of a fresh instance", fresh, self.x, self.noise)[0]
        if not torch.allclose(logits, self.outputs[0], **TOLERANCE):
            raise self.fail("a fresh instance loaded with the model's state_dict gives other outputs: some state is "
                            "not in state_dict, so a checkpoint would not restore the model",
                            "make every tensor the outputs depend on an nn.Parameter or a buffer "
                            "(register_buffer)")
