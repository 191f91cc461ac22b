"""Our Flax modules (apl_jax/nn) against diffusers'/transformers' PyTorch models on the same weights.

Only public PyTorch classes are used (UNet2DConditionModel, AutoencoderKL, CLIPTextModel), so the tests
hold on diffusers 0.39 and the latest releases alike. float32 throughout; tolerance 1e-4 of the scale.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apl_jax.errors import UserError
from apl_jax.models import SD15_UNET, load_model
from apl_jax.nn.clip import CLIPTextConfig
from apl_jax.nn.unet import UNet2DConditionModel, UNetConfig
from apl_jax.nn.vae import VAEConfig
from apl_jax.objective import apl_loss
from apl_jax.prefix import init_prefix
from apl_jax.tokenizer import tokenize
from conftest import REPO, assert_close

torch = pytest.importorskip("torch", reason="the parity tests need torch (requirements-pt.txt)")

PROMPTS = ["a photo of alz Ada Quill", ""]
PLACEHOLDER = 41128  # "alz"


def torch_models(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval()}


@pytest.fixture(scope="module", params=["tiny-random", "apl-mini"])
def pair(request, tmp_path_factory):
    """(ours, theirs): the model loaded by us from PyTorch safetensors, and diffusers'/transformers' on them."""
    folder = tmp_path_factory.mktemp("pt")
    load_model(request.param).save(folder, weights="pt")
    return load_model(folder), torch_models(folder)


def test_text_hidden_states(pair):
    ours, theirs = pair
    ids = tokenize(ours.tokenizer, PROMPTS)
    with torch.no_grad():
        want = theirs["text_encoder"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert_close(ours.encode_text(ours.params["text_encoder"], jnp.asarray(ids)), want)


def test_unet_noise_prediction(pair):
    ours, theirs = pair
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    context = rng.normal(size=(2, 77, ours.text_width)).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        want = theirs["unet"](torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    assert_close(ours.predict_noise(ours.params["unet"], jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)), want)


def test_vae_posterior_and_decode(pair):
    ours, theirs = pair
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    latents = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = theirs["vae"].encode(torch.from_numpy(images)).latent_dist
        decoded = theirs["vae"].decode(torch.from_numpy(latents)).sample.numpy()
    mean, std = ours.posterior(ours.params["vae"], jnp.asarray(images))
    assert_close(jnp.transpose(mean, (0, 3, 1, 2)), posterior.mean.numpy())  # ours channels-last
    assert_close(jnp.transpose(std, (0, 3, 1, 2)), posterior.std.numpy())
    assert_close(ours.decode(ours.params["vae"], jnp.asarray(latents)), decoded)


def test_sd15_shaped_unet_forward():
    """One forward of SD 1.5's UNet shapes (random weights) at 32x32 latents, batch 1."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from apl_jax import convert

    unet = UNet2DConditionModel(UNetConfig(in_channels=4, out_channels=4, **SD15_UNET))
    params = jax.jit(unet.init_weights)(jax.random.PRNGKey(0))
    with torch.device("meta"):  # no weights of its own: it takes ours (assign=True), memory stays at one copy
        theirs = TorchUNet(**SD15_UNET).eval()
    state = {name: torch.from_numpy(np.require(value, requirements="W"))  # copies only the read-only ones
             for name, value in convert.flax_to_pt(jax.device_get(params)).items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    del state
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(1, 4, 32, 32)).astype(np.float32)
    context = rng.normal(size=(1, 77, 768)).astype(np.float32)
    with torch.no_grad():
        want = theirs(torch.from_numpy(latents), 500, torch.from_numpy(context)).sample.numpy()
    del theirs
    got = jax.jit(unet.apply)({"params": params}, jnp.asarray(latents), jnp.array([500]), jnp.asarray(context))
    assert_close(got, want)


def test_apl_loss_and_gradient_match_the_pytorch_reference_step(tmp_path):
    """benchmarks/torch_reference.py's loss (three UNet passes, the official prefix insertion) at our
    noisy latents and timesteps: same loss, same gradient w.r.t. the prefix."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from torch_reference import ReferenceStep

    model = load_model("tiny-random")
    model.save(tmp_path, weights="pt")
    reference = ReferenceStep(tmp_path, 10, PLACEHOLDER, lr=1e-3, eta=1.0, device="cpu", dtype=torch.float32)
    prefix = init_prefix(model, 10, jax.random.PRNGKey(0))
    reference.prefix.data = torch.from_numpy(np.array(prefix))

    rng = np.random.default_rng(3)
    mean = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    private_ids = tokenize(model.tokenizer, ["a photo of alz Ada Quill", "alz smiling"])
    neutral_ids = tokenize(model.tokenizer, ["a photo of a person", ""])
    batch = {"posterior_mean": mean, "posterior_std": np.zeros_like(mean), "private_ids": private_ids,
             "neutral_ids": neutral_ids}
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    loss_fn = functools.partial(apl_loss, model=model, placeholder_id=PLACEHOLDER, negative_guidance=1.0)
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(prefix, model.params, jax.tree.map(jnp.asarray, batch), keys)

    # the timesteps and noise apl_loss draws from the keys (objective.py), handed to the reference
    t, eps = zip(*[(jax.random.randint(k_t, (), 0, 1000), jax.random.normal(k_eps, (8, 8, 4)))
                   for _, k_t, k_eps in (jax.random.split(key, 3) for key in keys)])
    t = torch.from_numpy(np.array(t)).long()
    z0 = torch.from_numpy(np.transpose(mean, (0, 3, 1, 2)) * model.latent_scaling)
    eps = torch.from_numpy(np.transpose(np.array(eps), (0, 3, 1, 2)))
    z_t = reference.scheduler.add_noise(z0, eps, t)
    want = reference.loss(z_t, t, torch.from_numpy(private_ids).long(), torch.from_numpy(neutral_ids).long())
    want.backward()
    assert_close(loss, want.item())
    assert_close(grad, reference.prefix.grad.numpy())


@pytest.mark.parametrize("config, raw, message", [
    (UNetConfig, {"addition_embed_type": "text_time"}, r"the UNet config has addition_embed_type='text_time', which "
                                                        r"this project's model code does not implement \(it supports None\)"),
    (UNetConfig, {"down_block_types": ["SimpleCrossAttnDownBlock2D"]}, r"down_block_types has 'SimpleCrossAttnDownBlock2D'"),
    (UNetConfig, {"transformer_layers_per_block": [1, 2]}, r"transformer_layers_per_block must be one number"),
    (VAEConfig, {"use_quant_conv": False}, r"the VAE config has use_quant_conv=False"),
    (CLIPTextConfig, {"hidden_act": "relu"}, r"the text encoder config has hidden_act='relu'"),
])
def test_configs_we_cannot_honour_are_clear_errors(config, raw, message):
    with pytest.raises(UserError, match=message):
        config.from_json(raw)


def test_config_keys_we_do_not_need_are_ignored():
    config = UNetConfig.from_json({"block_out_channels": [32, 64], "dropout": 0.1, "_class_name": "X", "upcast_attention": False})
    assert config.block_out_channels == (32, 64) and config == UNetConfig(block_out_channels=(32, 64))


def test_clip_model_features_match_transformers(tmp_path):
    """Our CLIPModel (the CLIP score's) reads a transformers PyTorch CLIP folder; same text and image features."""
    from transformers import CLIPConfig as TorchCLIPConfig
    from transformers import CLIPModel as TorchCLIPModel

    from apl_jax.clip_score import ClipScorer

    torch.manual_seed(0)
    theirs = TorchCLIPModel(TorchCLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)).eval()
    theirs.save_pretrained(tmp_path)
    scorer = ClipScorer(tmp_path)
    pixels = scorer.preprocess(np.random.default_rng(5).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8))
    ids = tokenize(scorer.tokenizer, ["a red square", "a photo of a cat"])
    with torch.no_grad():
        text = theirs.text_projection(theirs.text_model(torch.from_numpy(ids).long()).pooler_output).numpy()
        image = theirs.visual_projection(theirs.vision_model(torch.from_numpy(pixels)).pooler_output).numpy()
    assert_close(scorer._text_features(scorer.params, ids), text)
    assert_close(scorer._image_features(scorer.params, pixels), image)
