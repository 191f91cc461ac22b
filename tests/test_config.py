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
