"""FrozenSD: the frozen Stable Diffusion parts APL trains against.

Modules (code) and params (arrays) are kept apart: the modules are static and the
params travel as one pytree argument, so they can be replicated once and passed
into compiled steps instead of being captured by closures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp

from apl_jax import convert, single_file, storage
from apl_jax.errors import UserError
from apl_jax.files import read_safetensors, save_safetensors
from apl_jax.manifest import MANIFEST, verify
from apl_jax.nn.clip import CLIPTextConfig, CLIPTextModel
from apl_jax.nn.configs import to_json
from apl_jax.nn.unet import UNet2DConditionModel, UNetConfig
from apl_jax.nn.vae import AutoencoderKL, VAEConfig
from apl_jax.schedulers import SchedulerConfig, alphas_cumprod
from apl_jax.tokenizer import MAX_LENGTH, ClipTokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# Where the token-embedding table [V, D], the space a prefix lives in, sits in the text encoder's params
TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")
# (flax weights, PyTorch weights) file names per component, as diffusers/transformers write them
WEIGHT_FILES = {
    "text_encoder": ("flax_model.msgpack", "model.safetensors"),
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
}


def token_table(text_params: dict) -> jax.Array:
    return functools.reduce(lambda tree, key: tree[key], TOKEN_TABLE, text_params)


@dataclasses.dataclass(frozen=True)
class FrozenSD:
    tokenizer: ClipTokenizer
    text_config: CLIPTextConfig
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: SchedulerConfig
    # {"text_encoder", "unet", "vae", "scheduler" (its alphas_cumprod)}: the only arrays; pass them as arguments
    params: dict[str, Any]
    dtype: Any = jnp.float32  # the UNet's and the VAE's; the text encoder always runs in float32

    @property
    def text_width(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_encoder(self) -> CLIPTextModel:
        return CLIPTextModel(self.text_config)

    def encode_text(self, text_params, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """Final hidden states (after the final layer norm), the UNet's context; float32.

        `extra_embeddings` [K, D] become token ids V..V+K-1 (the prefix; prefix.py).
        """
        return self.text_encoder.apply({"params": text_params}, ids, extra_embeddings)

    def predict_noise(self, unet_params, latents: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        return self.unet.apply({"params": unet_params}, latents, timesteps, context)

    def posterior(self, vae_params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The VAE posterior's (mean, std), channels-last [B, h, w, C], of images [B, 3, H, W] in [-1, 1]."""
        return self.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)

    def decode(self, vae_params, latents: jax.Array) -> jax.Array:
        """Images [B, 3, H, W] (about [-1, 1]) of unscaled latents [B, C, h, w]."""
        return self.vae.apply({"params": vae_params}, latents, method=AutoencoderKL.decode)

    def with_remat(self) -> "FrozenSD":
        """The same model whose UNet recomputes each block's activations in the backward pass (model.remat)."""
        return dataclasses.replace(self, unet=self.unet.clone(remat=True))

    def save(self, folder: str | Path, weights: str = "flax", dtype: str = "float32") -> None:
        save_model(self, folder, weights, dtype)

    def save_single_file(self, path: str | Path) -> Path:
        return save_single_file(self, path)


def _cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def expected_shapes(text_config: CLIPTextConfig, unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, Any]:
    """The param shapes (jax.ShapeDtypeStruct trees) the configs imply; nothing is initialised."""
    key = jax.random.PRNGKey(0)
    return {
        "text_encoder": jax.eval_shape(CLIPTextModel(text_config).init_weights, key),
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
    }


def _assemble(tokenizer, text_config, unet, vae, scheduler: SchedulerConfig, params, dtype_name) -> FrozenSD:
    dtype = DTYPES[dtype_name]
    params = {
        "text_encoder": _cast(params["text_encoder"], jnp.float32),
        "unet": _cast(params["unet"], dtype),
        "vae": _cast(params["vae"], dtype),
        "scheduler": {"alphas_cumprod": jnp.asarray(alphas_cumprod(scheduler))},
    }
    return FrozenSD(tokenizer, text_config, unet, vae, scheduler, params, dtype)


# ---------------------------------------------------------------- presets and shipped models

# What every SD 1.x text encoder shares (CLIP's vocabulary and context); the rest is per model.
SD1_TEXT = dict(vocab_size=49408, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# Stable Diffusion 1.5's configs (CLIP ViT-L/14 text, 860M-parameter UNet, the f8 VAE)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def random_model(text: dict, unet: dict, vae: dict, dtype: str) -> FrozenSD:
    """Random SD-1.x-shaped weights, deterministic (seed 0), initialised under jax.jit."""
    text_config = CLIPTextConfig(**SD1_TEXT, **text)
    unet = UNet2DConditionModel(UNetConfig(in_channels=4, out_channels=4, **unet), DTYPES[dtype])
    vae = AutoencoderKL(VAEConfig(in_channels=3, out_channels=3, latent_channels=4, **vae), DTYPES[dtype])
    # Flax init takes long un-jitted even for tiny models (every op dispatched alone); jitted, seconds.
    init = jax.jit(
        lambda key: {
            "text_encoder": CLIPTextModel(text_config).init_weights(jax.random.fold_in(key, 0)),
            "unet": unet.init_weights(jax.random.fold_in(key, 1)),
            "vae": vae.init_weights(jax.random.fold_in(key, 2)),
        }
    )
    params = init(jax.random.PRNGKey(0))
    return _assemble(load_tokenizer(), text_config, unet, vae, SchedulerConfig(), params, dtype)


@functools.lru_cache(maxsize=2)
def tiny_random(dtype: str = "float32") -> FrozenSD:
    """For tests: CLIP width 32, UNet (32, 64), a 3-block VAE; 32 px images, 8x8x4 latents."""
    return random_model(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                  cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=32),
        dtype=dtype,
    )


def sd15_random(dtype: str = "float32") -> FrozenSD:
    """Stable Diffusion 1.5's exact shapes (860M-parameter UNet, CLIP ViT-L/14 text) with random weights: for benchmarks."""
    return random_model(text=SD15_TEXT, unet=SD15_UNET, vae=SD15_VAE, dtype=dtype)


PRESETS = {"tiny-random": tiny_random, "sd15-random": sd15_random}
# Model folders that ship inside the package, opened by name like any diffusers folder
SHIPPED_MODELS = Path(__file__).parent / "assets" / "models"


def shipped_models() -> list[str]:
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if (p / "model_index.json").is_file())


def resolve_model(path: str | Path) -> Path:
    """A shipped model's name -> its folder; anything else is a folder path."""
    return SHIPPED_MODELS / str(path) if str(path) in shipped_models() else Path(path)


# ---------------------------------------------------------------- loading

def _read_weights(folder: Path, component: str, expected) -> dict[str, Any]:
    sub = folder / component
    flax_name, pt_name = WEIGHT_FILES[component]
    if (sub / flax_name).is_file():
        try:
            params = flax.serialization.msgpack_restore((sub / flax_name).read_bytes())
        except ValueError as err:
            raise UserError(f"{sub / flax_name} is not a readable Flax msgpack file: {err}") from None
    elif (sub / pt_name).is_file():
        try:
            # One tensor at a time, each a device array once in the Flax layout: the load never holds
            # a second copy of the weights (an SD 1.5 UNet is 3.4 GB in float32).
            params = convert.pt_to_flax(read_safetensors(sub / pt_name), expected, leaf=jnp.asarray)
        except (OSError, ValueError) as err:
            raise UserError(f"{sub / pt_name} is not a readable safetensors file: {err}") from None
    else:
        raise UserError(f"{sub} has no weights: expected {flax_name} (Flax) or {pt_name} (PyTorch safetensors)")
    _check_weights(params, expected, sub, "its config.json")
    return params


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None


def _check_weights(params, expected, where: str, config: str) -> None:
    problems = convert.shape_mismatches(params, expected)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"weights in {where} do not match {config}: {problems[0]}{more}")


def _load_single_file(path: Path, dtype: str) -> FrozenSD:
    state, configs = single_file.read(path)
    text_config = CLIPTextConfig.from_json({**SD1_TEXT, **configs["text_encoder"]})
    unet = UNet2DConditionModel(UNetConfig.from_json(configs["unet"]), DTYPES[dtype])
    vae = AutoencoderKL(VAEConfig.from_json(configs["vae"]), DTYPES[dtype])
    params = {}
    for name, expected in expected_shapes(text_config, unet, vae).items():
        params[name] = single_file.component_params(state, name, configs[name], expected, path)
        _check_weights(params[name], expected, f"{path} ({name})", "the config stored in it or inferred from it")
    scheduler = SchedulerConfig.from_dict(configs.get("scheduler", {}))  # its defaults are SD 1.x's
    return _assemble(load_tokenizer(), text_config, unet, vae, scheduler, params, dtype)


def load_model(path: str | Path, dtype: str = "float32") -> FrozenSD:
    """A preset or shipped model's name, a diffusers-format Stable Diffusion folder (Flax or PyTorch
    safetensors weights), or a single-file SD 1.x checkpoint in the original layout (.safetensors, or
    .ckpt with torch). A folder with a MANIFEST.json has its files' sha256 checked first."""
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if str(path) in PRESETS:
        model = PRESETS[str(path)](dtype)
        # Fresh containers around the (cached) arrays: a caller that empties its params dict, as the
        # trainer does while moving them to the devices, must not empty the cache's.
        return dataclasses.replace(model, params=jax.tree.map(lambda x: x, model.params))
    folder = resolve_model(storage.local_copy(path) if storage.is_remote(path) else path)  # gs://: mirrored once
    if folder.is_file() and folder.suffix in single_file.SUFFIXES:
        return _load_single_file(folder, dtype)
    if folder.is_file():
        raise UserError(f"model file {folder} is not a single-file checkpoint ({' or '.join(single_file.SUFFIXES)}); "
                        "model.path is one of those, a diffusers folder or a model name")
    if not folder.is_dir():
        names = ", ".join([*PRESETS, *shipped_models()])
        raise UserError(f"model folder {folder} does not exist (and {path!r} is not a model name: {names})")
    if (folder / MANIFEST).is_file():
        verify(folder)
    for sub in SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise UserError(f"model folder {folder} has no {sub}/ subfolder (a diffusers SD folder has {', '.join(SUBFOLDERS)})")
    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).is_file():
            raise UserError(f"{folder / 'tokenizer'} has no {name}")

    text_config = CLIPTextConfig.from_json(_read_config(folder / "text_encoder" / "config.json"))
    unet = UNet2DConditionModel(UNetConfig.from_json(_read_config(folder / "unet" / "config.json")), DTYPES[dtype])
    vae = AutoencoderKL(VAEConfig.from_json(_read_config(folder / "vae" / "config.json")), DTYPES[dtype])
    params = {name: _read_weights(folder, name, expected)
              for name, expected in expected_shapes(text_config, unet, vae).items()}
    scheduler = SchedulerConfig.from_dict(_read_config(folder / "scheduler" / "scheduler_config.json"))
    return _assemble(load_tokenizer(folder / "tokenizer"), text_config, unet, vae, scheduler, params, dtype)


# ---------------------------------------------------------------- saving

def save_model(model: FrozenSD, folder: str | Path, weights: str = "flax", dtype: str = "float32") -> None:
    """Write a diffusers-format folder; weights "flax" (msgpack) or "pt" (PyTorch-named safetensors),
    stored as float32 or float16 (half the size; loading casts to model.dtype either way)."""
    if weights not in ("flax", "pt"):
        raise UserError(f"weights must be 'flax' or 'pt', got {weights!r}")
    if dtype not in ("float32", "float16"):
        raise UserError(f"saved weights dtype must be 'float32' or 'float16', got {dtype!r}")
    folder = Path(folder)
    model.tokenizer.save_pretrained(folder / "tokenizer")
    model.scheduler.save(folder / "scheduler", f"{'' if weights == 'pt' else 'Flax'}DDPMScheduler")
    for name, config in component_configs(model).items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "config.json").write_text(json.dumps(config, indent=2))
        params = _cast(model.params[name], jnp.dtype(dtype))
        flax_name, pt_name = WEIGHT_FILES[name]
        if weights == "flax":
            (sub / flax_name).write_bytes(flax.serialization.to_bytes(jax.device_get(params)))
        else:
            save_safetensors(sub / pt_name, convert.flax_to_pt(jax.device_get(params)), metadata={"format": "pt"})
    prefix = "" if weights == "pt" else "Flax"
    index = {
        "_class_name": f"{prefix}StableDiffusionPipeline",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", f"{'' if weights == 'pt' else 'Flax'}CLIPTextModel"],
        "unet": ["diffusers", f"{prefix}UNet2DConditionModel"],
        "vae": ["diffusers", f"{prefix}AutoencoderKL"],
        "scheduler": ["diffusers", f"{prefix}DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def component_configs(model: FrozenSD) -> dict[str, dict[str, Any]]:
    """The config.json of each component, as transformers' and diffusers' PyTorch classes read them too."""
    return {"text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **to_json(model.text_config)},
            "unet": {"_class_name": "UNet2DConditionModel", **to_json(model.unet.config)},
            "vae": {"_class_name": "AutoencoderKL", **to_json(model.vae.config)}}


def save_single_file(model: FrozenSD, path: str | Path) -> Path:
    """One original-layout (CompVis/LDM) SD 1.x .safetensors, float32, with our configs in its metadata."""
    path = single_file.check_output(path)
    components = {name: convert.flax_to_pt(jax.device_get(model.params[name])) for name in ("text_encoder", "unet", "vae")}
    configs = {"text_encoder": to_json(model.text_config), "unet": to_json(model.unet.config),
               "vae": to_json(model.vae.config), "scheduler": model.scheduler.to_dict()}
    return single_file.save(path, components, configs)
