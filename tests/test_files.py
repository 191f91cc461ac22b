"""Every file we write has the permissions the user's umask gives, as a file from open() has.

The training workdir is checked under umask 027 in test_train.py."""

import stat

import numpy as np
import pytest

from apl_jax.export import PrefixFile, save_prefix
from conftest import assert_umask_modes, umask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exports_follow_umask(tiny, tmp_path, mask):
    vectors = np.zeros((10, 32), np.float32)
    with umask(mask):
        save_prefix(tmp_path / "out/p.safetensors", PrefixFile(vectors, "alz", "test"), "diffusers")
        tiny.save(tmp_path / "out/pt", weights="pt")
        tiny.save(tmp_path / "out/flax", weights="flax")
        tiny.save_single_file(tmp_path / "out/tiny.safetensors")
    assert_umask_modes(tmp_path / "out", mask)
    expected = 0o644 if mask == 0o022 else 0o640
    assert stat.S_IMODE((tmp_path / "out/pt/unet/diffusion_pytorch_model.safetensors").stat().st_mode) == expected


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_pt_prefixes_follow_umask(tmp_path, mask):
    pytest.importorskip("torch", reason="the .pt formats need the optional torch extra")
    vectors = np.zeros((10, 32), np.float32)
    with umask(mask):
        save_prefix(tmp_path / "out/a1111.pt", PrefixFile(vectors, "alz", "test"), "a1111")
        save_prefix(tmp_path / "out/apl.pt", PrefixFile(vectors, "alz", "test"), "apl")
    assert_umask_modes(tmp_path / "out", mask)


def test_read_safetensors_matches_the_library_and_refuses_truncated_files(tmp_path):
    import ml_dtypes
    import safetensors.numpy

    from apl_jax.files import read_safetensors

    tensors = {"b.kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "a.bias": np.ones(5, np.float16),
               "c.scale": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16), "d.ids": np.array([7, -1], np.int64)}
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    got = dict(read_safetensors(path))
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        np.testing.assert_array_equal(got[name], want)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="the file ends inside"):
        list(read_safetensors(path))
