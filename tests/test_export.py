import pickle
import re
import sys
import zipfile

import numpy as np
import pytest

from apl_jax.errors import UserError
from apl_jax.export import PrefixFile, load_prefix, save_prefix
from conftest import REPO, assert_close, export_cli

VECTORS = np.random.default_rng(1).normal(size=(10, 32)).astype(np.float32)


@pytest.mark.parametrize("fmt, name", [("diffusers", "p.safetensors"), ("a1111", "p.safetensors")])
def test_safetensors_round_trip(tmp_path, fmt, name):
    save_prefix(tmp_path / name, PrefixFile(VECTORS, "alz", "test"), fmt)
    back = load_prefix(tmp_path / name)
    np.testing.assert_array_equal(back.vectors, VECTORS)
    assert back.placeholder == "alz"


@pytest.mark.parametrize("fmt", ["a1111", "apl"])
def test_pt_round_trip(tmp_path, fmt, capsys):
    torch = pytest.importorskip("torch", reason="the .pt formats need the optional torch extra")
    path = tmp_path / f"{fmt}.pt"
    save_prefix(path, PrefixFile(VECTORS, "alz", "test", step=7), fmt)
    back = load_prefix(path)
    np.testing.assert_array_equal(back.vectors, VECTORS)
    assert back.format == fmt
    raw = torch.load(path, weights_only=False)
    if fmt == "apl":
        assert isinstance(raw["string_to_param"], torch.nn.ParameterDict)
        assert int(raw["string_to_token"]["alz"]) == 41128
        assert "official APL format" in capsys.readouterr().err
    else:
        assert raw["string_to_token"] == {"*": 265} and raw["step"] == 7 and raw["name"] == "a1111"


# AUTOMATIC1111's modules/safe.py (its safe unpickle check, on by default), restated: the zip entry
# names it allows, and the globals its restricted unpickler lets a .pt file reference.
A1111_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"), ("__builtin__", "set"), ("_codecs", "encode"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
    *(("torch", name) for name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                   "ByteStorage", "float32", "BFloat16Storage")),
}


def a1111_safe_load(path):
    """What A1111's check does with a zip .pt: refuse unknown entries, then unpickle data.pkl with only
    A1111_GLOBALS and storages (empty ones: it checks the pickle, torch.load reads the data afterwards)."""
    import torch

    class Restricted(pickle.Unpickler):
        def persistent_load(self, saved_id):
            assert saved_id[0] == "storage"
            return torch.storage.TypedStorage(_internal=True)

        def find_class(self, module, name):
            if (module, name) not in A1111_GLOBALS:
                raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
            return super().find_class(module, name)

    with zipfile.ZipFile(path) as archive:
        bad = [name for name in archive.namelist() if not A1111_ZIP_ENTRY.match(name)]
        if bad:
            raise pickle.UnpicklingError(f"bad file inside {path}: {bad[0]}")
        (pkl,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        with archive.open(pkl) as f:
            return Restricted(f).load()


@pytest.mark.parametrize("fmt", ["a1111", "apl"])
def test_pt_passes_a1111_safe_unpickle(tmp_path, fmt):
    torch = pytest.importorskip("torch", reason="the .pt formats need the optional torch extra")
    path = save_prefix(tmp_path / f"{fmt}.pt", PrefixFile(VECTORS, "alz", "test", step=7), fmt)
    with zipfile.ZipFile(path) as archive:
        assert sorted(name.split("/", 1)[1] for name in archive.namelist()) == \
            (["data.pkl", "data/0", "version"] if fmt == "a1111" else ["data.pkl", "data/0", "data/1", "version"])
    checked = a1111_safe_load(path)
    params = checked["string_to_param"]
    assert list(getattr(params, "_parameters", params)) == (["*"] if fmt == "a1111" else ["alz"])
    # torch's weights-only loader: plain, as ComfyUI calls it, and with ParameterDict allowed for the official file
    if fmt == "a1111":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        assert loaded["string_to_token"] == {"*": 265} and loaded["name"] == "a1111" and loaded["step"] == 7
    else:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(loaded["string_to_param"], torch.nn.ParameterDict)
        assert list(loaded["string_to_param"]) == ["alz"] and int(loaded["string_to_token"]["alz"]) == 41128
    np.testing.assert_array_equal(next(iter(loaded["string_to_param"].values())).detach().numpy(), VECTORS)
    # the check bites: torch's own current layout is what A1111 refused
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(pickle.UnpicklingError, match=r"bad file inside .*plain.pt: plain/\.format_version"):
        a1111_safe_load(tmp_path / "plain.pt")


def test_pt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(UserError, match=r"\.pt prefix files needs torch: pip install torch"):
        save_prefix(tmp_path / "p.pt", PrefixFile(VECTORS, "alz", "test"), "apl")


def test_format_and_suffix_errors(tmp_path):
    with pytest.raises(UserError, match="format diffusers writes .safetensors files, not p.pt"):
        save_prefix(tmp_path / "p.pt", PrefixFile(VECTORS, "alz", "test"), "diffusers")
    with pytest.raises(UserError, match="prefix source .*missing.pt does not exist"):
        load_prefix(tmp_path / "missing.pt")
    import safetensors.numpy

    safetensors.numpy.save_file({"a": VECTORS, "b": VECTORS}, tmp_path / "two.safetensors")
    with pytest.raises(UserError, match="holds 2 tensors .*; a prefix file has exactly one"):
        load_prefix(tmp_path / "two.safetensors")


def test_cli_from_checkpoint_and_overwrite(tmp_path):
    from apl_jax.config import load_config
    from apl_jax.trainer import train

    config = load_config(REPO / "configs/tiny.yaml", ["train.steps=2", "train.batch_size=1"])
    train(config, tmp_path / "run")
    trained = load_prefix(tmp_path / "run/prefix.safetensors").vectors
    done = export_cli("prefix", "--from", str(tmp_path / "run"), "--to", str(tmp_path / "out.safetensors"),
                      "--format", "diffusers")
    assert done.returncode == 0, done.stderr
    assert "from checkpoint" in done.stdout
    np.testing.assert_array_equal(load_prefix(tmp_path / "out.safetensors").vectors, trained)
    again = export_cli("prefix", "--from", str(tmp_path / "run/checkpoints/2"), "--to", str(tmp_path / "out.safetensors"),
                       "--format", "diffusers")
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {tmp_path / 'out.safetensors'} exists; pass --force to overwrite it"
    forced = export_cli("prefix", "--from", str(tmp_path / "run/checkpoints/2"), "--to",
                        str(tmp_path / "out.safetensors"), "--format", "diffusers", "--force")
    assert forced.returncode == 0, forced.stderr


@pytest.fixture(scope="module")
def pytorch_pipeline(tmp_path_factory, tiny):
    """tiny-random exported with `python -m apl_jax.export model`, loaded by diffusers' PyTorch pipeline."""
    pytest.importorskip("torch", reason="the interop test needs torch (pip install torch)")
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("interop") / "tiny"
    done = export_cli("model", "--model", "tiny-random", "--out", str(folder))
    assert done.returncode == 0, done.stderr
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def test_pytorch_pipeline_matches_our_text_encoder_with_prefix(pytorch_pipeline, tiny, tmp_path):
    import jax.numpy as jnp
    import torch

    from apl_jax.prefix import encode_with_prefix
    from apl_jax.tokenizer import tokenize

    save_prefix(tmp_path / "prefix.safetensors", PrefixFile(VECTORS, "alz", "test"), "diffusers")
    pipe = pytorch_pipeline
    pipe.load_textual_inversion(str(tmp_path / "prefix.safetensors"))
    prompt = "a photo of Ada Quill"
    # diffusers rewrites "<alz>" into its 10 added tokens itself
    text = pipe.maybe_convert_prompt(f"<alz> {prompt}", pipe.tokenizer)
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0].numpy()
    ours = encode_with_prefix(tiny, tiny.params["text_encoder"], jnp.asarray(VECTORS),
                              jnp.asarray(tokenize(tiny.tokenizer, [f"alz {prompt}"])), 41128)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_pytorch_unet_and_vae_match(pytorch_pipeline, tiny):
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    context = rng.normal(size=(1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        theirs = pytorch_pipeline.unet(torch.from_numpy(latents), 10, torch.from_numpy(context)).sample.numpy()
        decoded = pytorch_pipeline.vae.decode(torch.from_numpy(latents)).sample.numpy()
    ours = tiny.predict_noise(tiny.params["unet"], jnp.asarray(latents), jnp.array([10]), jnp.asarray(context))
    assert_close(ours, theirs)  # our GEGLU is PyTorch's exact GELU (diffusers' old Flax UNet: tanh, 2e-3 off)
    assert_close(tiny.decode(tiny.params["vae"], jnp.asarray(latents)), decoded)
