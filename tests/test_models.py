"""vae/models/: the built-in architectures, the conformance check every model passes when it is built, a user's own
model from a file outside the package (docs/models.md's example), model files that rebuild any model, and 1 or 2
processes training the same conv and user model (real gloo process groups on the CPU)."""

import functools
import hashlib
import json
import math
import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vae.config import ModelConfig, config_to_dict, load_config
from vae.datasets.batches import to_unit_float
from vae.datasets.mnist import load_mnist
from vae.evaluation.metrics import score_batch
from vae.evaluation.scoring import load_model
from vae.models import ARCHITECTURES, MLPVAE, ConvVAE, ModelError, build_model, conformance
from vae.storage.checkpoint import KIND, CheckpointError, load_model_file, save_model_file

from .conftest import ACCELERATE_LAUNCH, REPO, assert_ok, python, read_jsonl, run_cmd, train_cmd

MNIST = (1, 28, 28)
USER_ARCH = "usermodel:TinyVAE"

# ---------------------------------------------------------------------------------------------------------
# mlp: the tutorial's model, unchanged

# sha256 over (name, bytes) of the state_dict after torch.manual_seed(0), and the next torch.rand(1) of the global
# stream, as vae/model.py's VAE gave them before vae/models/ existed: same names, same initial values, same random
# numbers drawn, so the default run trains the model it trained before, bit for bit.
MLP_BEFORE = {
    (2, (400,)): ("b096286407b57ba9f69722c712abad3a0255ef2365affb3a49e9d735c8c1c7a3", 0.33445703983306885),
    (20, (768, 768)): ("fa0447a768c3a67bba1129b97e8f1c5e87947020882cf4884735813700e6fd72", 0.7096824645996094),
}


def test_mlp_parameters_keep_their_names_and_shapes():
    model = build_model(ModelConfig(), MNIST)
    assert isinstance(model, MLPVAE)
    assert [(name, tuple(p.shape)) for name, p in model.named_parameters()] == [
        ("encoder.body.0.weight", (400, 784)), ("encoder.body.0.bias", (400,)),
        ("encoder.head.weight", (4, 400)), ("encoder.head.bias", (4,)),
        ("decoder.body.0.weight", (400, 2)), ("decoder.body.0.bias", (400,)),
        ("decoder.out.weight", (784, 400)), ("decoder.out.bias", (784,))]


@pytest.mark.parametrize("z_dim, hidden", list(MLP_BEFORE))
def test_mlp_is_built_bit_for_bit_as_before_and_the_check_draws_nothing(z_dim, hidden):
    torch.manual_seed(0)
    model = build_model(ModelConfig(z_dim=z_dim, hidden=hidden), MNIST)  # the conformance check included
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    assert (digest.hexdigest(), torch.rand(1).item()) == MLP_BEFORE[(z_dim, hidden)]


def _tutorial_mlp(weights: dict) -> types.SimpleNamespace:
    """The tutorial's MLP written out from a state_dict, the functions a model file's weights meant before."""
    def encode(x):
        h = F.relu(F.linear(x, weights["encoder.body.0.weight"], weights["encoder.body.0.bias"]))
        mu, logvar = F.linear(h, weights["encoder.head.weight"], weights["encoder.head.bias"]).chunk(2, dim=-1)
        return mu, logvar

    def decode(z):
        h = F.relu(F.linear(z, weights["decoder.body.0.weight"], weights["decoder.body.0.bias"]))
        return F.linear(h, weights["decoder.out.weight"], weights["decoder.out.bias"])

    return types.SimpleNamespace(encode=encode, decode=decode)


def _legacy_model_file(path: Path, weights: dict) -> None:
    """last.pt as train.py wrote it before model.arch: no image shape, a config without the keys added since."""
    config = config_to_dict(load_config(REPO / "configs/debug.yaml"))
    config.pop("loss", None)
    config["data"] = {k: config["data"][k] for k in ("root", "download", "train_subset", "eval_batch_size",
                                                     "on_device")}
    config["model"] = {"z_dim": 2, "hidden": [400]}
    torch.save({"kind": KIND, "format_version": 1, "model": weights, "weights": "trained", "config": config,
                "epoch": 3, "metrics": {"val/loss": 150.0}}, path)


def test_a_model_file_written_before_model_arch_loads_and_scores_the_same(tmp_path, mnist_root):
    torch.manual_seed(1)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in MLPVAE().state_dict().items()}  # not the initial ones
    _legacy_model_file(tmp_path / "last.pt", weights)
    model, cfg, _ = load_model(tmp_path / "last.pt")
    assert isinstance(model, MLPVAE) and model.image_shape == MNIST and cfg.model.arch == "mlp"
    images = to_unit_float(load_mnist(mnist_root, train=False)[0][:40])
    scored = [score_batch(m, images, torch.arange(40), iwae_k=8, seed=0) for m in (model, _tutorial_mlp(weights))]
    for key in scored[1]:
        assert torch.equal(scored[0][key], scored[1][key]), key


# ---------------------------------------------------------------------------------------------------------
# conv


@pytest.mark.parametrize("image_shape, flat", [((1, 28, 28), 16 * 7 * 7), ((3, 32, 32), 16 * 8 * 8)])
def test_conv_takes_any_image_shape_its_convolutions_halve(image_shape, flat):
    colours, pixels = image_shape[0], math.prod(image_shape)
    model = build_model(ModelConfig(arch="conv", z_dim=5, hidden=(48,), channels=(8, 16)), image_shape)
    assert isinstance(model, ConvVAE)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["encoder.convs.0.weight"] == (8, colours, 4, 4)
    assert shapes["encoder.convs.2.weight"] == shapes["decoder.deconvs.0.weight"] == (16, 8, 4, 4)
    assert shapes["encoder.body.0.weight"] == (48, flat) and shapes["encoder.head.weight"] == (10, 48)
    assert shapes["decoder.body.2.weight"] == (flat, 48) and shapes["decoder.deconvs.2.weight"] == (8, colours, 4, 4)
    x = torch.rand(4, pixels)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 5)
    assert model.decode(torch.randn(4, 5)).shape == (4, pixels)
    assert model.decode(torch.randn(4, 3, 5)).shape == (4, 3, pixels)
    assert model(x, torch.randn(4, 3, 5))[0].shape == (4, 3, pixels)
    # k samples decoded together give what each gives alone: the leading dimensions are only folded
    z = torch.randn(4, 3, 5)
    torch.testing.assert_close(model.decode(z)[:, 1], model.decode(z[:, 1]))


def test_activation_tanh_puts_tanh_wherever_relu_was_and_the_paper_config_builds_the_papers_model():
    for arch in ("mlp", "conv"):
        relu, tanh = (build_model(ModelConfig(arch=arch, z_dim=3, hidden=(16, 8), channels=(4,), activation=a), MNIST)
                      for a in ("relu", "tanh"))
        kinds = [[type(m).__name__ for m in model.modules() if not list(m.children())] for model in (relu, tanh)]
        assert [k.replace("ReLU", "Tanh") for k in kinds[0]] == kinds[1] and "ReLU" not in kinds[1], arch
        assert kinds[1].count("Tanh") == (4 if arch == "mlp" else 6), kinds[1]
    cfg = load_config(REPO / "configs/paper/iwae_vae.yaml")
    model = build_model(cfg.model, MNIST)
    widths = [tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")]
    assert widths == [(200, 784), (200, 200), (100, 200), (200, 50), (200, 200), (784, 200)]
    assert (cfg.data.binarize, cfg.train.batch_size, cfg.train.adam_eps, cfg.train.adam_betas) == \
        ("dynamic", 20, 1e-4, (0.9, 0.999))
    assert (cfg.train.lr, cfg.train.lr_schedule, cfg.train.epochs) == (1e-3, "iwae", 3280)


@pytest.mark.parametrize("image_shape, channels, steps", [
    ((1, 28, 28), (32, 64, 128), "28x28 -> 14x14 -> 7x7 -> 3.5x3.5"),
    ((1, 30, 30), (32, 64), "30x30 -> 15x15 -> 7.5x7.5"),
])
def test_conv_refuses_in_one_line_a_shape_its_convolutions_cannot_halve(image_shape, channels, steps):
    with pytest.raises(ModelError) as caught:
        build_model(ModelConfig(arch="conv", channels=channels), image_shape)
    message = str(caught.value)
    assert "\n" not in message and steps in message
    assert message.startswith(f"model.arch=conv: images of shape {image_shape} cannot be halved")
    assert "use fewer model.channels" in message


# ---------------------------------------------------------------------------------------------------------
# The user's own model, and the conformance check


def docs_example() -> str:
    """The complete user model of docs/models.md, as the page shows it."""
    text = (REPO / "docs" / "models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    found = [block for block in blocks if "class TinyVAE(GaussianVAE)" in block]
    assert len(found) == 1, "docs/models.md must show the TinyVAE example in one python block"
    return found[0]


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A folder outside the repository holding docs/models.md's usermodel.py."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "usermodel.py").write_text(docs_example())
    return folder


@pytest.fixture
def on_path(monkeypatch, user_folder, tmp_path):
    """The user's folder and this test's tmp_path importable, as PYTHONPATH makes them for train.py."""
    monkeypatch.syspath_prepend(str(user_folder))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("arch", [*ARCHITECTURES, USER_ARCH])
def test_every_architecture_and_the_user_model_pass_the_conformance_check(arch, on_path):
    for image_shape in (MNIST, (3, 32, 32)):
        cfg = ModelConfig(arch=arch, z_dim=3, hidden=(32,), channels=(8, 16))
        model = build_model(cfg, image_shape, check=False)
        assert model.z_dim == 3 and tuple(model.image_shape) == image_shape
        conformance.check_model(model, cfg, image_shape, rebuild=functools.partial(build_model, cfg, image_shape,
                                                                                    check=False))


class CountingVAE(MLPVAE):
    """The MLP, counting its encode calls in a buffer: state that a forward pass changes, as BatchNorm's running
    statistics are, and that follows every rule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros(()))

    def encode(self, x):
        self.calls += 1
        return super().encode(x)


def test_the_check_restores_the_random_stream_the_state_and_the_mode():
    cfg = ModelConfig(z_dim=3, hidden=(32,))
    torch.manual_seed(0)
    model = CountingVAE.from_config(cfg, MNIST).eval()
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    CountingVAE.from_config(cfg, MNIST)
    conformance.check_model(model, cfg, MNIST, rebuild=lambda: CountingVAE.from_config(cfg, MNIST))
    assert torch.equal(torch.rand(3), expected_next)
    assert not model.training and model.calls.item() == 0


# What each violation looks like: a small model in a file of its own, built as model.arch=<file>:Model.
BASE = '''
import torch
import torch.nn.functional as F
from torch import nn

from vae.models import GaussianVAE


class Base(GaussianVAE):
    def __init__(self, cfg, image_shape):
        super().__init__(cfg.z_dim, image_shape)
        self.enc = nn.Linear(self.pixels, 2 * cfg.z_dim)
        self.dec = nn.Linear(cfg.z_dim, self.pixels)

    def encode(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        return self.dec(z)
'''

VIOLATIONS = {  # name: (the model's source after BASE, what its one line says; {at}: its last line's place)
    "not_a_module": ("""
class Model:
    pass""", "Model is not a torch.nn.Module subclass"),
    "missing_encode": ("""
class Model(nn.Module):
    z_dim = 2
    from_config = classmethod(lambda cls, cfg, image_shape: cls())

    def decode(self, z):
        return z

    def forward(self, x, noise=None):
        return x, x, x""", "Model does not follow the model protocol: it does not define encode"),
    "no_decode": ("""
class Model(GaussianVAE):
    def encode(self, x):
        return x, x""", "it does not define decode"),
    "constructor_raises": ("""
class Model(Base):
    def __init__(self, cfg, image_shape):
        raise ValueError("width must be even")""",
                           "building it with Model.from_config(cfg, (1, 28, 28)) raised ValueError: width must be "
                           "even {at}"),
    "z_dim": ("""
class Model(Base):
    def __init__(self, cfg, image_shape):
        super().__init__(cfg, image_shape)
        self.z_dim = 3""", "the model's z_dim is 3, the config's model.z_dim 2"),
    "no_parameters": ("""
class Model(Base):
    def __init__(self, cfg, image_shape):
        GaussianVAE.__init__(self, cfg.z_dim, image_shape)
        self.layers = [nn.Linear(self.pixels, 2 * cfg.z_dim), nn.Linear(cfg.z_dim, self.pixels)]

    def encode(self, x):
        return self.layers[0](x).chunk(2, dim=-1)

    def decode(self, z):
        return self.layers[1](z)""", "the model has no trainable parameters"),
    "encode_raises": ("""
class Model(Base):
    def encode(self, x):
        return self.dec(x).chunk(2, dim=-1)""",
                      "encode on a float32 tensor [3, 784] raised RuntimeError: mat1 and mat2 shapes cannot be "
                      "multiplied (3x784 and 2x784) {at}"),
    "mu_shape": ("""
class Model(Base):
    def encode(self, x):
        mu, logvar = super().encode(x)
        return mu[:, :1], logvar""",
                 "encode's mu must be a floating-point tensor [3, 2], got a float32 tensor [3, 1]"),
    "logits_shape": ("""
class Model(Base):
    def decode(self, z):
        return self.dec(z)[..., :-1]""",
                     "decode's logits for z [3, 2] must be a floating-point tensor [3, 784], got a float32 tensor "
                     "[3, 783]"),
    "flattens_samples": ("""
class Model(Base):
    def decode(self, z):
        return self.dec(z.reshape(-1, 2))""",
                         "decode's logits for z [3, 2, 2] must be a floating-point tensor [3, 2, 784], got a "
                         "float32 tensor [6, 784]"),
    "not_finite": ("""
class Model(Base):
    def encode(self, x):
        mu, logvar = super().encode(x)
        return mu, torch.log(logvar * 0)""", "encode's logvar is not finite (nan or inf)"),
    "dropout": ("""
class Model(Base):
    def encode(self, x):
        return super().encode(F.dropout(x, 0.5, self.training))""",
                "two calls with the same images and noise gave different outputs"),
    "ignores_noise": ("""
class Model(Base):
    def forward(self, x, noise=None):
        mu, logvar = self.encode(x)
        z = mu if noise.dim() == 2 else mu[:, None].expand_as(noise)
        return self.decode(z), mu, logvar""", "forward's logits are not decode(mu + noise * exp(logvar / 2))"),
    "batchnorm": ("""
class Model(Base):
    def __init__(self, cfg, image_shape):
        super().__init__(cfg, image_shape)
        self.norm = nn.BatchNorm1d(self.pixels)

    def encode(self, x):
        return super().encode(self.norm(x))""",
                  "forward on 1 image raised ValueError: Expected more than 1 value per channel when training"),
    "batch_mean": ("""
class Model(Base):
    def encode(self, x):
        return super().encode(x - x.mean(0))""",
                   "the logits of an image alone differ from its logits in a batch of 3"),
    "unregistered_state": ("""
class Model(Base):
    def __init__(self, cfg, image_shape):
        super().__init__(cfg, image_shape)
        self.offset = torch.randn(self.pixels)

    def decode(self, z):
        return self.dec(z) + self.offset""",
                           "a fresh instance loaded with the model's state_dict gives other outputs"),
    "syntax_error": ("""
def broken(:""", "importing module 'bad_syntax_error' failed with SyntaxError: invalid syntax (bad_syntax_error.py, "
                     "line {last}); fix that module"),
    "import_fails": ("""
import a_package_nobody_installed""", "importing module 'bad_import_fails' failed with ModuleNotFoundError: No "
                     "module named 'a_package_nobody_installed' {at}"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_each_broken_rule_stops_the_build_with_one_line_naming_it(name, on_path):
    source, expected = VIOLATIONS[name]
    text = BASE + "\n" + source + "\n"
    (on_path / f"bad_{name}.py").write_text(text)
    last = len(text.splitlines())  # where each broken line is
    expected = expected.replace("{at}", f"(at bad_{name}.py:{last})").replace("{last}", str(last))
    with pytest.raises(ModelError) as caught:
        build_model(ModelConfig(arch=f"bad_{name}:Model", z_dim=2, hidden=(16,)), MNIST)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"model.arch=bad_{name}:Model: ")
    assert expected in message


def test_a_module_or_class_that_is_not_there_is_one_line_saying_where_it_was_looked_for(on_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    with pytest.raises(ModelError) as caught:
        build_model(ModelConfig(arch="nowhere_to_be_found:Model"), MNIST)
    assert str(caught.value) == (
        f"model.arch=nowhere_to_be_found:Model: no module 'nowhere_to_be_found' importable from {os.getcwd()} (the "
        f"current directory) or PYTHONPATH (/somewhere/else); run from the folder that holds nowhere_to_be_found.py, "
        f"or add that folder to PYTHONPATH")
    with pytest.raises(ModelError) as caught:
        build_model(ModelConfig(arch="usermodel:TinyVea"), MNIST)
    assert re.fullmatch(r"model\.arch=usermodel:TinyVea: module 'usermodel' \(.*usermodel\.py\) has no class "
                        r"'TinyVea'; its nn\.Module classes: TinyVAE", str(caught.value))


# ---------------------------------------------------------------------------------------------------------
# Model files: any model rebuilt from the file alone


@pytest.mark.parametrize("arch, image_shape", [("conv", (3, 32, 32)), (USER_ARCH, (1, 16, 16))])
def test_a_model_file_rebuilds_its_model_from_the_file_alone(arch, image_shape, on_path):
    cfg = load_config(None, [f"model.arch={arch}", "model.z_dim=3", "model.hidden=[24]", "model.channels=[4,8]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, image_shape)
    save_model_file(on_path / "last.pt", model, config_to_dict(cfg), epoch=1, metrics={})
    assert load_model_file(on_path / "last.pt")["image_shape"] == list(image_shape)
    loaded, loaded_cfg, _ = load_model(on_path / "last.pt")
    assert type(loaded).__name__ == type(model).__name__ and tuple(loaded.image_shape) == image_shape
    x, noise = torch.rand(2, math.prod(image_shape)), torch.randn(2, 4, 3)
    for ours, theirs in zip(model(x, noise), loaded(x, noise), strict=True):
        assert torch.equal(ours, theirs)


def test_a_model_file_with_a_malformed_image_shape_is_refused_in_one_line(tmp_path):
    cfg = load_config(None, [])
    save_model_file(tmp_path / "last.pt", build_model(cfg.model, MNIST), config_to_dict(cfg), epoch=1, metrics={})
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    payload["image_shape"] = [1, 28]
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"records the image shape \[1, 28\], not \(channels, height, width\)"):
        load_model(tmp_path / "last.pt")


# ---------------------------------------------------------------------------------------------------------
# Real runs: the user model through train.py and evaluate.py; 1 against 2 processes (conv and the user model)

RUN = ("data.train_subset=500", "train.cpu=true", "train.dist_backend=gloo", "log.every_steps=5")
MODELS = {"conv": ("model.arch=conv", "model.z_dim=4", "model.hidden=[64]"),
          "user": (f"model.arch={USER_ARCH}", "model.z_dim=2", "model.hidden=[64]"),
          # the IWAE bound as the objective, on images binarized afresh each epoch: k noise draws per image
          "iwae": ("model.arch=mlp", "model.z_dim=2", "model.hidden=[64]", "loss.iwae_k=4", "data.binarize=dynamic")}


def _pythonpath(*folders: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root, user_folder):
    """trained(model, processes): the run directory of one epoch of configs/debug.yaml on 500 images with that
    model on that many CPU processes, trained once per module, and the launch's output."""
    done = {}

    def on(model: str, processes: int):
        if (model, processes) not in done:
            run_dir = tmp_path_factory.mktemp(f"{model}-{processes}")
            launch = [*ACCELERATE_LAUNCH, "--num_processes", str(processes), *(["--multi_gpu"] * (processes > 1))]
            result = run_cmd([*launch, *train_cmd(run_dir, mnist_root, *RUN, *MODELS[model])], timeout=600,
                             env=_pythonpath(user_folder))
            assert_ok(result)
            done[model, processes] = run_dir, result
        return done[model, processes]

    return on


@pytest.mark.slow
def test_the_user_model_trains_through_train_py_and_evaluate_py_scores_it(trained, user_folder, tmp_path):
    run_dir, _ = trained("user", 1)
    payload = load_model_file(run_dir / "last.pt")
    assert payload["config"]["model"]["arch"] == USER_ARCH and payload["image_shape"] == [1, 28, 28]
    val_loss = read_jsonl(run_dir / "metrics.jsonl")[-1]["val/loss"]
    assert 0 < val_loss < 784 * math.log(2) - 20  # 10 steps from the untrained decoder's 543 nats (logits ~ 0)
    result = python("evaluate.py", "--ckpt", str(run_dir / "last.pt"), "--iwae-k", "4", "--out-dir",
                    str(tmp_path / "eval"), env=_pythonpath(user_folder))
    assert_ok(result)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 10000 and abs(metrics["nelbo"] - val_loss) < 2
    assert (tmp_path / "eval" / "reconstructions.png").is_file()
    # Without the user's folder on the path, evaluate.py says what is missing, in one line
    result = python("evaluate.py", "--ckpt", str(run_dir / "last.pt"), "--no-figures", "--out",
                    str(tmp_path / "m.json"), env={"PYTHONPATH": None})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: '{run_dir / 'last.pt'}': its model cannot be built here: model.arch={USER_ARCH}: no module "
        f"'usermodel' importable from {REPO} (the current directory) or PYTHONPATH (not set); run from the folder "
        f"that holds usermodel.py, or add that folder to PYTHONPATH")


@pytest.mark.slow
def test_train_py_stops_a_model_that_breaks_a_rule_in_one_line_before_training(tmp_path, mnist_root):
    (tmp_path / "bad_batchnorm.py").write_text(BASE + "\n" + VIOLATIONS["batchnorm"][0] + "\n")
    result = python(*train_cmd(tmp_path / "run", mnist_root, "model.arch=bad_batchnorm:Model"),
                    env=_pythonpath(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: model.arch=bad_batchnorm:Model: forward on 1 image raised ValueError: Expected more than 1 value per "
        "channel when training")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_2_processes_train_the_1_process_model(model, trained):
    """The tolerance of tests/test_parity.py: DDP's all-reduce sums in another order, nothing else differs."""
    alone, _ = trained(model, 1)
    ddp, result = trained(model, 2)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["param_checksum_per_rank"])) == 1
    assert result.stdout.count("epoch   1 ") == 1  # only the main process prints
    a, b = (load_model_file(run / "last.pt") for run in (alone, ddp))
    assert a["config"]["model"]["arch"] == b["config"]["model"]["arch"] == MODELS[model][0].split("=")[1]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-5, msg=f"{model}: {key}")
    assert (a["config"]["loss"], a["config"]["data"]) == (b["config"]["loss"], b["config"]["data"])
    # it learned: 10 steps from the untrained decoder's 543 nats (logits ~ 0)
    assert read_jsonl(alone / "metrics.jsonl")[-1]["val/loss"] < 784 * math.log(2) - 20
