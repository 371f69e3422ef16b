import dataclasses

import pytest

from vae.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, parse_override

from .conftest import REPO, python, train_cmd


def test_defaults_are_the_tutorial():
    cfg = Config()
    assert (cfg.model.z_dim, cfg.model.hidden) == (2, (400,))
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr) == (50, 20, 1e-3)


def test_z2_yaml_is_the_tutorial_and_names_the_run():
    cfg = load_config(REPO / "configs/z2.yaml")
    assert (cfg.model.z_dim, cfg.model.hidden, cfg.train.batch_size, cfg.train.epochs, cfg.train.lr) == \
        (2, (400,), 50, 20, 1e-3)
    assert cfg.run.name == "z2" and str(cfg.run_dir) == "runs/z2"


def test_every_shipped_config_loads_and_says_how_to_run_it():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
        assert path.read_text().startswith("#"), f"{path} must start with a comment saying how to run it"
        assert "Run:" in path.read_text().split("\n\n")[0]


PRESETS = {  # configs/accelerate/*.yaml: what each must start
    "cpu_2_processes.yaml": ("MULTI_GPU", 2, 1, "no"),
    "one_gpu.yaml": ("NO", 1, 1, "no"),
    "one_gpu_2_processes.yaml": ("MULTI_GPU", 2, 1, "no"),
    "one_node_all_gpus.yaml": ("MULTI_GPU", 8, 1, "no"),
    "multi_node.yaml": ("MULTI_GPU", 16, 2, "no"),
    "bf16.yaml": ("NO", 1, 1, "bf16"),
}


def test_every_launcher_preset_loads_in_accelerates_own_loader_and_says_how_to_use_it():
    from accelerate.commands.config.config_args import load_config_from_file

    presets = REPO / "configs" / "accelerate"
    assert sorted(p.name for p in presets.glob("*.yaml")) == sorted(PRESETS)
    for name, (distributed, processes, machines, precision) in PRESETS.items():
        loaded = load_config_from_file(str(presets / name))
        assert (loaded.distributed_type.value, loaded.num_processes, loaded.num_machines,
                str(loaded.mixed_precision)) == (distributed, processes, machines, precision), name
        assert f"accelerate launch --config_file configs/accelerate/{name}" in (presets / name).read_text(), name


def test_precedence_cli_beats_yaml_beats_defaults():
    cfg = load_config(REPO / "configs/debug.yaml", ["train.epochs=5", "model.z_dim=10", "model.hidden=[64, 32]"])
    assert cfg.train.epochs == 5 and cfg.model.z_dim == 10 and cfg.model.hidden == (64, 32)
    assert cfg.data.train_subset == 2000  # from the YAML
    assert cfg.train.lr == 1e-3  # default


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.epochs = 3


def test_float_written_without_dot_is_a_number():
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("trian.lr=1", "unknown key 'trian'"),
    ("train.lr=0", "train.lr: must be > 0"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.lr=fast", "train.lr: must be a number"),
    ("model.z_dim=0", "model.z_dim: must be >= 1"),
    ("model.z_dim=2.5", "model.z_dim: must be an integer"),
    ("train.epochs=0", "train.epochs: must be >= 1"),
    ("train.cpu=1", "train.cpu: must be true or false"),
    ("train.lr_schedule=linear", "train.lr_schedule: must be one of 'constant', 'cosine'"),
    ("model.hidden=[]", "model.hidden: must be a non-empty list"),
    ("model.hidden=abc", "model.hidden: must be a list of integers"),
    ("train=3", "train: must be a mapping"),
    ("train.epochs.x=3", "'train.epochs' is a value, not a section"),
    ("epochs", "expected key=value"),
    ("train.seed=-1", "train.seed: must be between 0 and 2**32 - 1"),
    ("train.seed=4294967296", "train.seed: must be between 0 and 2**32 - 1"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.dist_timeout_s=inf", "train.dist_timeout_s: must be a number or null"),
    ("train.dist_timeout_s=1e12", "train.dist_timeout_s: must be > 0 and <= 604800"),
    ("train.num_threads=100000", "train.num_threads: must be between 1 and 1024 or null"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs/debug.yaml", [override])
    text = str(error.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("text", ["train: {epochs: 3}\ntrain: {batch_size: 7}\n",
                                  "train:\n  epochs: 3\n  epochs: 4\n"])
def test_a_key_given_twice_in_the_yaml_is_refused_in_one_line(tmp_path, text):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"twice.yaml line \d+: '(train|epochs)' is given twice") as error:
        load_config(path)
    assert "\n" not in str(error.value)


def test_yaml_problems_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_a_plain_dict():
    cfg = load_config(REPO / "configs/z20.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_bare_no_is_the_mixed_precision_setting_not_false(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"


def test_overrides_are_read_by_their_keys_type():
    cfg = load_config(REPO / "configs/debug.yaml", ["model.hidden=[1, 2]", "train.mixed_precision=null",
                                                    "train.lr=1e-3", "train.resume=false", 'log.tags=["a, b", c]',
                                                    "train.epochs=1_000", "train.num_threads=null"])
    assert (cfg.model.hidden, cfg.train.mixed_precision, cfg.train.lr) == ((1, 2), None, 1e-3)
    assert (cfg.train.resume, cfg.log.tags, cfg.train.epochs, cfg.train.num_threads) == (False, ("a, b", "c"),
                                                                                          1000, None)
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")  # text until the key's type reads it
    # a W&B sweep agent passes a list as Python writes it
    assert load_config(None, ["log.tags=['baseline', 'z2']"]).log.tags == ("baseline", "z2")


def test_yaml_merge_keys_load_and_may_be_overridden(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("train: &common {epochs: 3, batch_size: 7}\nlog:\n  every_steps: 5\n"
                    "model:\n  <<: {z_dim: 4}\n  z_dim: 6\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.model.z_dim) == (3, 6)


@pytest.mark.parametrize("text", ["0123", "12:30", "007", "1_000", "0x10", "1.10", "/tmp/my #1 run", "yes", "1e3"])
def test_a_string_key_takes_the_override_text_exactly_as_typed(text):
    cfg = load_config(REPO / "configs/debug.yaml", [f"run.dir={text}", f"run.name={text}", f"log.group={text}"])
    assert (cfg.run.dir, cfg.run.name, cfg.log.group) == (text, text, text)


@pytest.mark.parametrize("override", ["train.epochs=0x10", "train.epochs=1.5", "train.epochs=12:30",
                                      "train.resume=maybe"])
def test_a_number_or_switch_that_would_lose_something_is_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: must be"):
        load_config(REPO / "configs/debug.yaml", [override])


@pytest.mark.parametrize("argv, expected", [
    (["--config", "configs/debug.yaml", "train.lr=-1"], "error: train.lr: must be > 0 (got -1.0)"),
    (["--config", "configs/debug.yaml", "train.grad_accum_steps=0"],
     "error: train.grad_accum_steps: must be >= 1 (got 0)"),
    (["--config", "configs/missing.yaml"], "error: config file 'configs/missing.yaml' not found"),
    (["--config", "configs/debug.yaml", "--bogus"], "error: unrecognized arguments: --bogus"),
    ([], "error: the following arguments are required: --config"),
    (["--config", "configs/debug.yaml", "train.cuda_graph=true", "log.wandb=false"],
     "error: train.cuda_graph: needs a CUDA device (this run is on cpu); set train.cuda_graph=false"),
    (["--config", "configs/debug.yaml", "train.dist_backend=nccl", "log.wandb=false"],
     "error: train.dist_backend: nccl needs CUDA GPUs (this run is on cpu); use gloo or auto"),
])
def test_train_cli_errors_are_one_line_without_traceback(argv, expected):
    result = python("train.py", *argv)
    assert result.returncode != 0
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_a_train_subset_larger_than_the_dataset_is_one_line(tmp_path, mnist_root):
    result = python(*train_cmd(tmp_path / "run", mnist_root, "data.train_subset=70000"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: data.train_subset: 70000 is more than the 60000 training images of "
                                     "mnist; lower it, or null for all of them")


def test_a_config_error_answers_before_torch_is_imported():
    """A typo in a key or value is told in a tenth of a second, not after torch's seconds of importing."""
    check = ("import sys, train\n"
             "code = train.main(['--config', 'configs/debug.yaml', 'train.lr=-1'])\n"
             "print('exit', code, 'torch imported:', 'torch' in sys.modules)")
    result = python("-c", check)
    assert "exit 1 torch imported: False" in result.stdout, result.stdout + result.stderr
    assert result.stderr.strip() == "error: train.lr: must be > 0 (got -1.0)"
