"""Single-file SD 1.x checkpoints (original layout), checked against diffusers' own single-file code."""

import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax.traverse_util import flatten_dict

from apl_jax import convert, single_file
from apl_jax.errors import UserError
from apl_jax.models import SD1_TEXT, SD15_TEXT, SD15_UNET, SD15_VAE, expected_shapes, load_model, random_model
from apl_jax.nn.clip import CLIPTextConfig
from apl_jax.nn.configs import to_json
from apl_jax.nn.unet import UNet2DConditionModel, UNetConfig
from apl_jax.nn.vae import AutoencoderKL, VAEConfig
from apl_jax.tokenizer import tokenize
from conftest import REPO, assert_close, train_env

PROMPT = "a photo of Ada Quill"


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """tiny-random as one file (written by the CLI) and as a diffusers folder (diffusers reads its configs there)."""
    root = tmp_path_factory.mktemp("single")
    done = subprocess.run([sys.executable, "-m", "apl_jax.export", "model", "--model", "tiny-random", "--format",
                           "single-file", "--out", str(root / "tiny.safetensors")],
                          env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "one SD 1.x checkpoint in the original layout" in done.stdout
    tiny.save(root / "folder", weights="pt")
    return root


@pytest.fixture(scope="module")
def conventional():
    """A tiny random model that keeps SD 1.x's conventions for what shapes cannot tell (64-wide text heads,
    8 UNet heads, 32 VAE norm groups, 512 px), so a file of it needs no stored config."""
    return random_model(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, projection_dim=64),
        unet=dict(sample_size=256, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                  cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=512),
        dtype="float32",
    )


def assert_same_params(a, b):
    for name in ("text_encoder", "unet", "vae"):
        assert jax.tree.structure(a.params[name]) == jax.tree.structure(b.params[name])
        for x, y in zip(jax.tree.leaves(a.params[name]), jax.tree.leaves(b.params[name])):
            np.testing.assert_array_equal(x, y)


def test_layout_and_round_trip(tiny, files):
    state = safetensors.numpy.load_file(files / "tiny.safetensors")
    # original names: tiny's UNet has levels (32, attention) and (64, none), one resnet each
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)
    assert state["model.diffusion_model.input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert state["model.diffusion_model.output_blocks.1.1.conv.weight"].shape == (64, 64, 3, 3)
    assert state["model.diffusion_model.middle_block.2.emb_layers.1.weight"].shape == (64, 128)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert state["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (16, 32, 1, 1)
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 32)
    assert len(state) == sum(len(jax.tree.leaves(tiny.params[c])) for c in ("text_encoder", "unet", "vae"))
    assert_same_params(load_model(files / "tiny.safetensors"), tiny)


def test_diffusers_from_single_file_matches_ours(tiny, files):
    """diffusers' StableDiffusionPipeline.from_single_file reads our file (configs from the local folder,
    nothing downloaded) and its text encoder, UNet and VAE give our outputs."""
    torch = pytest.importorskip("torch", reason="the interop test needs torch (pip install torch)")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(files / "tiny.safetensors"), config=str(files / "folder"),
                                                    local_files_only=True)
    ids = tokenize(tiny.tokenizer, [PROMPT])
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        noise = pipe.unet(torch.from_numpy(latents), 10, torch.from_numpy(text)).sample.numpy()
        decoded = pipe.vae.decode(torch.from_numpy(latents)).sample.numpy()
    ours_text = tiny.encode_text(tiny.params["text_encoder"], jnp.asarray(ids))
    assert_close(ours_text, text)
    assert_close(tiny.predict_noise(tiny.params["unet"], jnp.asarray(latents), jnp.array([10]), jnp.asarray(text)), noise)
    assert_close(tiny.decode(tiny.params["vae"], jnp.asarray(latents)), decoded)


def diffusers_original_layout(files):
    """diffusers' PyTorch tiny pipeline written in the original layout by diffusers' own key correspondence:
    its single-file converters (original -> diffusers) run on our file with every tensor replaced by a
    marker (its index), and each diffusers tensor is put back where its marker came from."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    ours = safetensors.numpy.load_file(files / "tiny.safetensors")
    keys = sorted(ours)
    markers = {key: torch.full(ours[key].shape, float(i)) for i, key in enumerate(keys)}
    pipe = StableDiffusionPipeline.from_pretrained(files / "folder", local_files_only=True)
    converted = {
        "unet": convert_ldm_unet_checkpoint(markers, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(markers, dict(pipe.vae.config)),
        "text_encoder": convert_ldm_clip_checkpoint(markers),
    }
    state = {}
    for component, tensors in converted.items():
        source = {name: keys[int(marker.flatten()[0])] for name, marker in tensors.items()}
        for name, value in getattr(pipe, component).state_dict().items():
            # transformers 5's CLIPTextModel names its weights without the "text_model." that the
            # converter (and the checkpoints) still use
            key = source[name] if name in source else source[f"text_model.{name}"]
            state[key] = value.reshape(ours[key].shape).contiguous()
    assert sorted(state) == keys  # diffusers maps every tensor we write, and no two to one place
    return state


def test_file_in_diffusers_layout_loads_in_ours(tiny, files, tmp_path):
    pytest.importorskip("torch", reason="the interop test needs torch (pip install torch)")
    import safetensors.torch

    state = diffusers_original_layout(files)
    with safetensors.safe_open(files / "tiny.safetensors", framework="numpy") as f:
        metadata = f.metadata()  # our configs: tiny's head counts and norm groups are not SD 1.x's
    safetensors.torch.save_file(state, tmp_path / "theirs.safetensors", metadata=metadata)
    model = load_model(tmp_path / "theirs.safetensors")
    assert_same_params(model, tiny)
    ids = jnp.asarray(tokenize(tiny.tokenizer, [PROMPT]))
    np.testing.assert_allclose(np.asarray(model.encode_text(model.params["text_encoder"], ids)),
                               np.asarray(tiny.encode_text(tiny.params["text_encoder"], ids)), atol=1e-4)


def test_ckpt_with_ema_and_lightning_callbacks(conventional, tmp_path, monkeypatch):
    """A .ckpt as SD 1.x releases are: {"state_dict": ..., "callbacks": {ModelCheckpoint: ...}}, EMA copies of the
    UNet beside its weights, the text encoder under its pre-text_model names, no configs. Read with torch's
    weights-only loader; the UNet comes from model.diffusion_model.*, not from model_ema.*; the configs are
    inferred from the shapes."""
    torch = pytest.importorskip("torch", reason="reading .ckpt files needs torch")
    ours = safetensors.numpy.load_file(conventional.save_single_file(tmp_path / "ours.safetensors"))
    state = {key.replace("transformer.text_model.", "transformer."): torch.from_numpy(value) for key, value in ours.items()}
    ema = {"model_ema." + "".join(key.split(".")[1:]): value + 1 for key, value in state.items()
           if key.startswith("model.diffusion_model.")}
    for module in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))  # only for torch.save to name the class
    lightning = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]
    lightning.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": lightning.__name__})
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999)}, "global_step": 470000,
                "callbacks": {lightning.ModelCheckpoint: {"best_model_score": None}}}, tmp_path / "sd.ckpt")
    model = load_model(tmp_path / "sd.ckpt")
    assert_same_params(model, conventional)
    assert model.text_config.num_attention_heads == 1
    for config, theirs in ((model.unet.config, conventional.unet.config), (model.vae.config, conventional.vae.config)):
        assert config == theirs
    ids = jnp.asarray(tokenize(model.tokenizer, [PROMPT]))
    np.testing.assert_array_equal(np.asarray(model.encode_text(model.params["text_encoder"], ids)),
                                  np.asarray(conventional.encode_text(conventional.params["text_encoder"], ids)))


def test_ckpt_is_never_unpickled_unsafely(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .ckpt files needs torch")
    torch.save({"state_dict": {}, "thing": types.SimpleNamespace(a=1)}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match=r"evil.ckpt is not a checkpoint torch's weights-only loader reads: "
                                        r".*types.SimpleNamespace"):
        load_model(tmp_path / "evil.ckpt")


def test_no_guessing_outside_sd1_conventions(files, tmp_path):
    """tiny-random's 4 text heads of width 8 and its VAE's 8 norm groups do not show in its shapes: without its
    stored config, an error, not a model with other heads or groups."""
    safetensors.numpy.save_file(safetensors.numpy.load_file(files / "tiny.safetensors"), tmp_path / "bare.safetensors")
    with pytest.raises(UserError, match=r"bare.safetensors: its text encoder's width 32 is not a multiple of CLIP's "
                                        r"64-wide heads, and the file holds no config to say otherwise \(files written by "
                                        r"`python -m apl_jax.export model --format single-file` do\)$"):
        load_model(tmp_path / "bare.safetensors")
    with pytest.raises(UserError, match=r"its VAE's channels \[16, 32, 32\] are not multiples of SD 1.x's 32 norm groups"):
        shapes = {key: value.shape for key, value in safetensors.numpy.load_file(tmp_path / "bare.safetensors").items()}
        single_file._vae_config(shapes, tmp_path / "bare.safetensors")


def test_sd15_layout_and_inferred_configs():
    """At SD 1.5's real shapes (no weights allocated: zero-stride arrays): the original names and shapes we
    write are the ones diffusers' converters turn into exactly its SD 1.5 UNet, VAE and CLIP state dicts,
    and the configs inferred back are SD 1.5's."""
    torch = pytest.importorskip("torch", reason="the interop test needs torch (pip install torch)")
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextModel
    from transformers import CLIPTextConfig as TorchCLIPTextConfig

    text_config = CLIPTextConfig(**SD1_TEXT, **SD15_TEXT)
    unet = UNet2DConditionModel(UNetConfig(**SD15_UNET))
    vae = AutoencoderKL(VAEConfig(latent_channels=4, **SD15_VAE))
    zero = np.zeros((), np.float32)
    components = {}
    for component, tree in expected_shapes(text_config, unet, vae).items():
        flat = flatten_dict(tree)
        components[component] = {name: convert.to_pt_layout(path, np.broadcast_to(zero, flat[path].shape))
                                 for name, path in convert.pt_names(tree).items()}
    original = single_file.to_original(components, {"unet": to_json(unet.config), "vae": to_json(vae.config),
                                                    "text_encoder": {}})
    shapes = {key: value.shape for key, value in original.items()}
    # the keys diffusers itself looks for to call a file SD 1.x
    assert shapes["model.diffusion_model.output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] == (77, 768)

    with torch.device("meta"):
        theirs = {"unet": TorchUNet2DConditionModel(**SD15_UNET), "vae": TorchAutoencoderKL(**SD15_VAE),
                  "text_encoder": CLIPTextModel(TorchCLIPTextConfig(**SD1_TEXT, **SD15_TEXT))}
    converted = {"unet": convert_ldm_unet_checkpoint(original, dict(theirs["unet"].config)),
                 "vae": convert_ldm_vae_checkpoint(original, dict(theirs["vae"].config)),
                 "text_encoder": convert_ldm_clip_checkpoint(original)}
    for component, model in theirs.items():
        want = {name: tuple(value.shape) for name, value in model.state_dict().items()}
        # transformers 5's CLIPTextModel has no "text_model." in its names; the converter still writes it
        got = {name.removeprefix("text_model."): tuple(value.shape) for name, value in converted[component].items()}
        assert got == want

    inferred = single_file.infer_configs(shapes, Path("sd15"))
    assert inferred["unet"] == {**{k: list(v) if isinstance(v, tuple) else v for k, v in SD15_UNET.items()},
                                "in_channels": 4, "out_channels": 4, "use_linear_projection": False,
                                "transformer_layers_per_block": 1}
    assert inferred["vae"] == {**{k: list(v) if isinstance(v, tuple) else v for k, v in SD15_VAE.items()},
                               "in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 32,
                               "scaling_factor": 0.18215}
    assert inferred["text_encoder"] == {**SD15_TEXT, "vocab_size": 49408, "max_position_embeddings": 77}


@pytest.mark.parametrize("keys, message", [
    ({"<alz>": (10, 32)}, r"is not a Stable Diffusion 1.x checkpoint: it has no text_encoder "
                          r"\(cond_stage_model.transformer.\*\), unet \(model.diffusion_model.\*\), vae "
                          r"\(first_stage_model.\*\) weights"),
    ({"conditioner.embedders.1.model.positional_embedding": (77, 1280), "model.diffusion_model.out.2.bias": (4,)},
     r"is an SDXL checkpoint; SDXL is not supported yet \(only SD 1.x\)"),
    ({"cond_stage_model.model.token_embedding.weight": (49408, 1024), "model.diffusion_model.out.2.bias": (4,)},
     r"is a Stable Diffusion 2.x checkpoint \(OpenCLIP text encoder\); SD 2.x is not supported yet \(only SD 1.x\)"),
])
def test_other_files_are_one_line_errors(tmp_path, keys, message):
    safetensors.numpy.save_file({k: np.zeros(s, np.float16) for k, s in keys.items()}, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "m.safetensors")


def test_inpainting_unet_is_refused(conventional, tmp_path):
    state = safetensors.numpy.load_file(conventional.save_single_file(tmp_path / "ours.safetensors"))
    state["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((32, 9, 3, 3), np.float32)
    safetensors.numpy.save_file(state, tmp_path / "inpaint.safetensors")
    with pytest.raises(UserError, match=r"its UNet takes 9 input channels \(an inpainting or instruct-pix2pix model\?\); "
                                        r"only text-to-image SD 1.x checkpoints \(4 channels\) are supported yet"):
        load_model(tmp_path / "inpaint.safetensors")


def test_cli_single_file_needs_safetensors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "apl_jax.export", "model", "--model", "tiny-random", "--format",
                           "single-file", "--out", str(tmp_path / "m.ckpt")],
                          env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: a single-file model is written as .safetensors, not m.ckpt"


def test_metadata_holds_our_configs(tiny, files):
    with safetensors.safe_open(files / "tiny.safetensors", framework="numpy") as f:
        configs = json.loads(f.metadata()[single_file.CONFIG_METADATA])
    assert configs["text_encoder"]["num_attention_heads"] == 4 and configs["vae"]["norm_num_groups"] == 8
    assert configs["unet"]["sample_size"] == 8 and configs["scheduler"]["beta_schedule"] == "scaled_linear"


def test_other_model_files_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UserError, match=r"model file .*model.bin is not a single-file checkpoint \(.safetensors or .ckpt\); "
                                        r"model.path is one of those, a diffusers folder or a model name"):
        load_model(tmp_path / "model.bin")
