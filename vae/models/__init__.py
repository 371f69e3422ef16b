"""The models, chosen by `model.arch`: a built-in name from ARCHITECTURES, or a user's class as
`package.module:Class`. Every model follows the contract of vae.models.protocol and passes vae.models.conformance
when it is built.

A new built-in architecture is one file in this folder (a GaussianVAE subclass) and one entry in ARCHITECTURES;
a user's own model needs no change here at all (docs/models.md).
"""

from __future__ import annotations

import importlib
import os
import sys

from torch import nn

from ..config import ModelConfig
from ..errors import HarnessError, first_line
from . import conformance
from .conv import ConvVAE
from .mlp import MLPVAE
from .protocol import VAE, GaussianVAE, ModelError, reparameterize

__all__ = ["ARCHITECTURES", "VAE", "ConvVAE", "GaussianVAE", "MLPVAE", "ModelError", "build_model", "model_class",
           "reparameterize"]

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": MLPVAE,
    "conv": ConvVAE,
}


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], *, check: bool = True) -> nn.Module:
    """The model `cfg.arch` names, built for images of `image_shape` (C, H, W), on the CPU, with
    `model.image_shape` set; unless check=False, it has passed the conformance check (vae.models.conformance)."""
    image_shape = _valid_shape(image_shape)
    cls = model_class(cfg.arch)

    def build() -> nn.Module:
        try:
            return cls.from_config(cfg, image_shape)
        except HarnessError:
            raise
        except Exception as error:  # the user's constructor: one line with where it failed
            raise ModelError(f"model.arch={cfg.arch}: building it with {cls.__name__}.from_config(cfg, "
                             f"{image_shape}) raised {first_line(error)}{conformance.where(error)}; fix its "
                             f"constructor") from None

    model = build()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.arch={cfg.arch}: {cls.__name__}.from_config returned "
                         f"{conformance.describe(model)}, not the model; return cls(...)")
    if getattr(model, "image_shape", None) is None:
        model.image_shape = image_shape  # the model files record it (vae.storage.checkpoint), whatever the class keeps
    if check:
        conformance.check_model(model, cfg, image_shape, rebuild=build)
    return model


def model_class(arch: str) -> type[nn.Module]:
    """The class of a built-in name, or the user's `package.module:Class`, imported and checked."""
    if arch not in ARCHITECTURES and ":" not in arch:
        raise ModelError(f"model.arch={arch}: no such architecture; use one of {', '.join(ARCHITECTURES)}, or a "
                         f"class of your own as package.module:Class (docs/models.md)")
    cls = ARCHITECTURES.get(arch) or _import_class(arch)
    conformance.check_class(cls, arch)
    return cls


def _valid_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ModelError(f"image shape {image_shape!r}: must be (channels, height, width), three positive integers")
    return shape


def _import_class(arch: str) -> type:
    """`package.module:Class`, imported as `import package.module` would be from the current directory, which is
    put on sys.path (after everything else: a file there cannot hide an installed package)."""
    module_name, _, class_name = arch.partition(":")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            path = os.environ.get("PYTHONPATH") or "not set"
            raise ModelError(f"model.arch={arch}: no module '{module_name}' importable from {here} (the current "
                             f"directory) or PYTHONPATH ({path}); run from the folder that holds "
                             f"{module_name.replace('.', '/')}.py, or add that folder to PYTHONPATH") from None
        raise _import_failed(arch, module_name, error) from None
    except Exception as error:  # a SyntaxError or a failing import inside the user's module
        raise _import_failed(arch, module_name, error) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(name for name, value in vars(module).items()
                       if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module_name)
        raise ModelError(f"model.arch={arch}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                         f"class '{class_name}'; its nn.Module classes: {', '.join(found) or 'none'}")
    return cls


def _import_failed(arch: str, module_name: str, error: BaseException) -> ModelError:
    return ModelError(f"model.arch={arch}: importing module '{module_name}' failed with {first_line(error)}"
                      f"{conformance.where(error)}; fix that module")
