"""Training that cannot silently go wrong: NaN guard, one run per workdir, crash-safe metrics, outputs checked first."""

import numpy as np
import pytest
import safetensors.numpy

from apl_jax import preflight
from apl_jax.errors import UserError
from conftest import export_cli, sample_cli


# ---------------------------------------------------------------- outputs checked before any model loads


@pytest.mark.parametrize("make, message", [
    (lambda t: preflight.folder(t / "f", "--save-dir"), "--save-dir {t}/f is a file, not a folder"),
    (lambda t: preflight.folder(t / "f" / "sub", "--save-dir"), "--save-dir {t}/f/sub cannot be created: {t}/f is a file"),
    (lambda t: preflight.image_file(t / "grid", "--out"), "--out {t}/grid must end in .png, .jpg, .jpeg or .webp"),
    (lambda t: preflight.image_file(t / "d.png", "--out"), "--out {t}/d.png is a folder; give a file name in it"),
    (lambda t: preflight.file(t / "f" / "p.pt", "--to"), "--to {t}/f/p.pt cannot be created: {t}/f is a file"),
])
def test_output_path_messages(tmp_path, make, message):
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UserError) as raised:
        make(tmp_path)
    assert str(raised.value) == message.format(t=tmp_path)


def test_unwritable_output_folder():
    # /sys refuses new files even to root (chmod would not stop root)
    try:
        open("/sys/apl-jax-probe", "w")
    except OSError as err:
        reason = err.strerror
    else:
        pytest.fail("/sys accepted a file")
    with pytest.raises(UserError) as raised:
        preflight.folder("/sys/apl-jax/out", "--out")
    assert str(raised.value) == f"--out /sys/apl-jax/out is not writable: cannot create files in /sys ({reason})"


def test_writable_outputs_pass(tmp_path):
    assert preflight.folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert preflight.image_file(tmp_path / "grid.JPG", "--out") == tmp_path / "grid.JPG"
    assert not (tmp_path / "new").exists()  # checking creates nothing


NO_MODEL = ["--model", "/no/such/model"]  # loading it would fail: an error about anything else came first


@pytest.mark.parametrize("args, message", [
    (["--out", "{t}/grid"], "--out {t}/grid must end in .png, .jpg, .jpeg or .webp"),
    (["--out", "{t}"], "--out {t} is a folder; give a file name in it"),
    (["--save-dir", "{t}/file.png"], "--save-dir {t}/file.png is a file, not a folder"),
    (["--scale", "-1"], "--scale must be at least 1, got -1"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--seed", str(2**64)], f"--seed must be in [0, 4294967295] (JAX keys hold 32 bits), got {2**64}"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295] (JAX keys hold 32 bits), got -1"),
])
def test_sample_refuses_bad_outputs_before_loading_the_model(tmp_path, args, message):
    (tmp_path / "file.png").write_text("not a folder")
    done = sample_cli("--prompt", "x", *NO_MODEL, "--out", str(tmp_path / "grid.png"),
                      *[a.format(t=tmp_path) for a in args])
    assert done.returncode == 2
    assert done.stderr.strip() == "error: " + message.format(t=tmp_path)


def test_export_refuses_bad_targets_before_reading_or_writing(tmp_path):
    safetensors.numpy.save_file({"<alz>": np.zeros(32, np.float32)}, tmp_path / "flat.safetensors")
    done = export_cli("prefix", "--from", str(tmp_path / "flat.safetensors"), "--to", str(tmp_path / "out.safetensors"),
                      "--format", "diffusers")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {tmp_path / 'flat.safetensors'} holds an array of shape (32,), not a prefix: "
                                   "a prefix is [K, D] (K vectors of the text encoder's width)")
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "file").write_text("")
    done = export_cli("prefix", "--from", str(tmp_path / "missing.safetensors"), "--to",
                      str(tmp_path / "file" / "p.safetensors"), "--format", "diffusers")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --to {tmp_path}/file/p.safetensors cannot be created: {tmp_path}/file is a file"
    done = export_cli("model", *NO_MODEL, "--out", str(tmp_path / "file"), "--force")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --out {tmp_path}/file is a file, not a folder"
