"""Fuzzing the config loader: every invalid YAML document or override is a one-line ConfigError naming the
problem (never another exception, never a traceback); every valid one loads."""

import dataclasses
import tempfile
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vae.config import Config, ConfigError, config_to_dict, load_config

SECTIONS = {f.name: [g.name for g in dataclasses.fields(typing.get_type_hints(Config)[f.name])]
            for f in dataclasses.fields(Config)}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
known_or_random_key = st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=10))
documents = st.one_of(
    values,
    st.dictionaries(known_or_random_key,
                    st.one_of(values, st.dictionaries(st.one_of(st.sampled_from(sum(SECTIONS.values(), [])),
                                                                st.text(max_size=10)), values, max_size=4)),
                    max_size=4),
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_text(text: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text)
        return load_config(path)


def _assert_one_line_or_loads(load):
    try:
        cfg = load()
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message and "Traceback" not in message
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(documents)
def test_any_yaml_document_loads_or_is_a_one_line_error(document):
    _assert_one_line_or_loads(lambda: _load_text(yaml.safe_dump(document)))


@FUZZ
@given(st.text(max_size=60))
def test_any_text_file_loads_or_is_a_one_line_error(text):
    _assert_one_line_or_loads(lambda: _load_text(text))


@FUZZ
@given(st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
                          st.text(max_size=20)), max_size=3))
def test_any_overrides_load_or_are_a_one_line_error(overrides):
    _assert_one_line_or_loads(lambda: load_config(None, overrides))


valid_configs = st.fixed_dictionaries({
    "model": st.fixed_dictionaries({"z_dim": st.integers(1, 64),
                                    "hidden": st.lists(st.integers(1, 2048), min_size=1, max_size=3)}),
    "train": st.fixed_dictionaries({"epochs": st.integers(1, 500), "batch_size": st.integers(1, 4096),
                                    "lr": st.floats(1e-7, 1.0), "seed": st.integers(0, 2**31),
                                    "lr_schedule": st.sampled_from(["constant", "cosine"]),
                                    "mixed_precision": st.sampled_from([None, "no", "fp16", "bf16"])}),
    "data": st.fixed_dictionaries({"train_subset": st.one_of(st.none(), st.integers(1, 60000))}),
})


@FUZZ
@given(valid_configs)
def test_every_valid_config_loads_with_its_values(document):
    cfg = _load_text(yaml.safe_dump(document))
    loaded = config_to_dict(cfg)
    for section, entries in document.items():
        for key, value in entries.items():
            assert loaded[section][key] == value
