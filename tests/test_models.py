import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apl_jax.errors import UserError
from apl_jax.models import load_model
from apl_jax.tokenizer import tokenize


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """tiny-random written once with Flax weights and once with PyTorch safetensors."""
    root = tmp_path_factory.mktemp("models")
    tiny.save(root / "flax", weights="flax")
    tiny.save(root / "pt", weights="pt")
    return root


def outputs(model):
    ids = jnp.asarray(tokenize(model.tokenizer, ["a photo of a cat", ""]))
    context = model.encode_text(model.params["text_encoder"], ids)
    latents = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    noise = model.predict_noise(model.params["unet"], latents, jnp.array([10, 500]), context)
    pixels = jax.random.uniform(jax.random.PRNGKey(1), (2, 3, 32, 32), minval=-1, maxval=1)
    mean, std = model.posterior(model.params["vae"], pixels)
    return [np.asarray(x) for x in (context, noise, mean, std)]


def test_folder_layout(saved):
    assert (saved / "flax/unet/diffusion_flax_model.msgpack").is_file()
    assert (saved / "flax/text_encoder/flax_model.msgpack").is_file()
    assert (saved / "pt/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "pt/vae/diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "pt/text_encoder/model.safetensors").is_file()
    assert json.loads((saved / "pt/unet/config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert json.loads((saved / "pt/model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_pt_names_are_pytorch_names(saved):
    import safetensors.numpy

    unet = safetensors.numpy.load_file(saved / "pt/unet/diffusion_pytorch_model.safetensors")
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].shape == (32, 32)
    assert unet["conv_in.weight"].shape == (32, 4, 3, 3)  # PyTorch OIHW
    assert "time_embedding.linear_1.weight" in unet  # a real "_1" name, not a list index
    vae = safetensors.numpy.load_file(saved / "pt/vae/diffusion_pytorch_model.safetensors")
    assert "encoder.mid_block.attentions.0.to_q.weight" in vae
    text = safetensors.numpy.load_file(saved / "pt/text_encoder/model.safetensors")
    assert text["text_model.embeddings.token_embedding.weight"].shape == (49408, 32)


def test_flax_and_pytorch_folders_load_identically(tiny, saved):
    reference = outputs(tiny)
    for kind in ("flax", "pt"):
        model = load_model(saved / kind)
        for name in ("text_encoder", "unet", "vae"):
            for a, b in zip(jax.tree.leaves(tiny.params[name]), jax.tree.leaves(model.params[name])):
                np.testing.assert_array_equal(a, b)
        for a, b in zip(reference, outputs(model)):
            np.testing.assert_array_equal(a, b)


def test_resave_of_loaded_model(saved, tmp_path):
    model = load_model(saved / "pt")
    model.save(tmp_path / "again", weights="flax")
    again = load_model(tmp_path / "again")
    for a, b in zip(outputs(model), outputs(again)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_option(saved):
    model = load_model(saved / "flax", dtype="bfloat16")
    assert model.params["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert model.params["vae"]["decoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    # the prefix's text path stays float32 (docs/design.md); the UNet takes the context in bfloat16
    assert model.params["text_encoder"]["text_model"]["final_layer_norm"]["scale"].dtype == jnp.float32
    context = model.encode_text(model.params["text_encoder"], jnp.asarray(tokenize(model.tokenizer, ["a cat"])))
    assert context.dtype == jnp.float32
    noise = model.predict_noise(model.params["unet"], jnp.zeros((1, 4, 8, 8), jnp.bfloat16), jnp.array([10]), context)
    assert noise.dtype == jnp.bfloat16


def copy_of(saved, tmp_path, kind="flax"):
    folder = tmp_path / kind
    shutil.copytree(saved / kind, folder)
    return folder


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match=r"model folder .*nowhere does not exist \(and .* is not a model name: tiny-random, sd15-random, apl-mini, apl-mini-db, apl-mini-ft\)"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("sub", ["unet", "tokenizer", "scheduler"])
def test_missing_subfolder(saved, tmp_path, sub):
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / sub)
    with pytest.raises(UserError, match=rf"model folder .*flax has no {sub}/ subfolder"):
        load_model(folder)


def test_missing_weights_file(saved, tmp_path):
    folder = copy_of(saved, tmp_path, "pt")
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"pt/vae has no weights: expected diffusion_flax_model.msgpack \(Flax\) or diffusion_pytorch_model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("kind", ["flax", "pt"])
def test_weights_not_matching_config(saved, tmp_path, kind):
    folder = copy_of(saved, tmp_path, kind)
    config = json.loads((folder / "unet/config.json").read_text())
    config["cross_attention_dim"] = 48
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"weights in .*/unet do not match its config.json: .* has shape \(32, 32\), config expects \(48, 32\)"):
        load_model(folder)


def test_text_encoder_not_matching_config(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    config = json.loads((folder / "text_encoder/config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "text_encoder/config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"weights in .*/text_encoder do not match its config.json: missing text_model/encoder/layers/2"):
        load_model(folder)


def test_unknown_dtype():
    with pytest.raises(UserError, match="model.dtype must be one of float32, bfloat16, got 'float16'"):
        load_model("tiny-random", dtype="float16")


def test_moving_the_weights_to_the_devices_frees_the_host_copy_as_it_goes(tiny):
    """The trainer's path: load_model, then replicate_consuming of its params; the preset cache stays whole."""
    from apl_jax import parallel

    model = load_model("tiny-random")
    params = model.params
    assert params is not tiny.params and params["unet"] is not tiny.params["unet"]  # fresh containers
    frozen = parallel.replicate_consuming(params)
    assert params == {}  # popped: nothing of the host copy is held here any more
    assert jax.tree.structure(frozen) == jax.tree.structure(tiny.params)
    for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(tiny.params)):
        assert got.shape == (jax.device_count(), *want.shape)
        np.testing.assert_array_equal(parallel.unreplicate(got), want)
    assert load_model("tiny-random").params["unet"].keys() == tiny.params["unet"].keys()  # the cache is intact
