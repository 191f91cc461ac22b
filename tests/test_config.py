import pytest

from apl_jax.config import load_config
from apl_jax.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  learning_rate: 0.5\nprefix:\n  placeholder: zyx\n")
    config = load_config(path, ["train.steps=9", "parallel.num_processes=2", "prefix.init_word=person"])
    assert config.train.steps == 9
    assert config.train.learning_rate == 0.5
    assert config.prefix.placeholder == "zyx"
    assert config.prefix.init_word == "person"
    assert config.parallel.num_processes == 2
    assert config.train.negative_guidance == 1.0  # default kept


def test_int_accepted_for_float():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ("train.steps=three", "config key train.steps must be int, got 'three'"),
        ("train.steps=true", "config key train.steps must be int, got True"),
        ("nosuch.key=1", "unknown config key nosuch"),
        ("train", "--set expects key=value, got 'train'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(bad)


def test_every_numeric_key_has_a_range():
    import dataclasses

    from apl_jax.config import RANGES, Config

    numeric = {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
               for f in dataclasses.fields(section.default_factory) if f.type.replace(" | None", "") in ("int", "float")}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "config key train.steps must be >= 1, got 0"),
    ("train.learning_rate=0", "config key train.learning_rate must be > 0 and finite, got 0.0"),
    ("train.learning_rate=.nan", "config key train.learning_rate must be > 0 and finite, got nan"),
    ("train.checkpoint_every=0", "config key train.checkpoint_every must be >= 1, got 0"),
    ("train.log_every=0", "config key train.log_every must be >= 1, got 0"),
    ("train.keep_checkpoints=0", "config key train.keep_checkpoints must be >= 1, got 0"),
    ("train.seed=-1", "config key train.seed must be in [0, 4294967295], got -1"),
    (f"train.seed={2**64}", f"config key train.seed must be in [0, 4294967295], got {2**64}"),
    ("train.nan_policy=ignore", "config key train.nan_policy must be one of stop, skip, got 'ignore'"),
    ("train.lr_schedule=linear", "config key train.lr_schedule must be one of constant, cosine, got 'linear'"),
    ("data.resolution=0", "config key data.resolution must be >= 8, got 0"),
    ("data.identity_prob=1.5", "config key data.identity_prob must be in [0, 1], got 1.5"),
    ("data.source=files", "config key data.source must be one of synthetic, folders, got 'files'"),
    ("prefix.num_vectors=76", "config key prefix.num_vectors must be in [1, 75], got 76"),
    ("model.dtype=float16", "config key model.dtype must be one of float32, bfloat16, got 'float16'"),
    ("train.learning_rate=fast", "config key train.learning_rate must be float, got 'fast'"),
])
def test_values_out_of_range(override, message):
    with pytest.raises(UserError) as raised:
        load_config(None, [override])
    assert str(raised.value) == message


def test_scientific_notation_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 5E-4\n  negative_guidance: 2e0\n")
    config = load_config(path)
    assert (config.train.learning_rate, config.train.negative_guidance) == (0.0005, 2.0)


def test_shipped_paths_resolve_from_the_project(tmp_path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(tmp_path)
    assert load_config(None).data.templates == str(REPO / "configs" / "data" / "templates.yaml")
