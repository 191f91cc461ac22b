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
import safetensors.numpy
from diffusers import FlaxAutoencoderKL, FlaxDDPMScheduler, FlaxUNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule

from apl_jax import convert, single_file, storage
from apl_jax.errors import UserError
from apl_jax.files import save_safetensors
from apl_jax.manifest import MANIFEST, verify
from apl_jax.tokenizer import MAX_LENGTH, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
# (flax weights, PyTorch weights) file names per component, as diffusers/transformers write them
WEIGHT_FILES = {
    "text_encoder": ("flax_model.msgpack", "model.safetensors"),
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"),
}
PT_CLASS_NAMES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


@dataclasses.dataclass(frozen=True)
class FrozenSD:
    tokenizer: CLIPTokenizer
    text_config: CLIPTextConfig
    unet: FlaxUNet2DConditionModel
    vae: FlaxAutoencoderKL
    scheduler: FlaxDDPMScheduler
    # {"text_encoder", "unet", "vae", "scheduler"}: the only arrays; pass them as arguments
    params: dict[str, Any]
    dtype: Any = jnp.float32

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

    def text_module(self, extra_tokens: int = 0) -> FlaxCLIPTextModule:
        """The CLIP text transformer; `extra_tokens` rows appended to its token table.

        Flax checks param shapes against the module's config, so the appended-prefix
        trick needs a module whose vocab_size counts the extra rows.
        """
        config = self.text_config
        if extra_tokens:
            config = CLIPTextConfig.from_dict({**config.to_dict(), "vocab_size": config.vocab_size + extra_tokens})
        return FlaxCLIPTextModule(config=config, dtype=self.dtype)

    def encode_text(self, text_params, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """Final hidden states (after the final layer norm), the UNet's context.

        `extra_embeddings` [K, D] become token ids V..V+K-1. Never read the pooled
        output of such an encoding: it finds EOS by argmax(ids).
        """
        extra = 0 if extra_embeddings is None else extra_embeddings.shape[0]
        if extra:
            embed = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
            table = jnp.concatenate([embed, extra_embeddings.astype(embed.dtype)], axis=0)
            text_params = _replace_token_table(text_params, table)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        out = self.text_module(extra).apply({"params": text_params}, ids, jnp.ones_like(ids), positions)
        return out[0]

    def predict_noise(self, unet_params, latents: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        return self.unet.apply({"params": unet_params}, latents, timesteps, context).sample

    def save(self, folder: str | Path, weights: str = "flax", dtype: str = "float32") -> None:
        save_model(self, folder, weights, dtype)

    def save_single_file(self, path: str | Path) -> Path:
        return save_single_file(self, path)


def _replace_token_table(text_params, table):
    embeddings = {**text_params["text_model"]["embeddings"], "token_embedding": {"embedding": table}}
    return {**text_params, "text_model": {**text_params["text_model"], "embeddings": embeddings}}


def _cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _text_init_shapes(module: FlaxCLIPTextModule):
    ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids, ids)["params"])


def expected_shapes(text_config: CLIPTextConfig, unet: FlaxUNet2DConditionModel, vae: FlaxAutoencoderKL) -> dict[str, Any]:
    """The param shapes (jax.ShapeDtypeStruct trees) the configs imply; nothing is initialised."""
    key = jax.random.PRNGKey(0)
    return {
        "text_encoder": _text_init_shapes(FlaxCLIPTextModule(text_config)),
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
    }


def _assemble(tokenizer, text_config, unet, vae, scheduler_config, params, dtype_name) -> FrozenSD:
    dtype = DTYPES[dtype_name]
    scheduler = FlaxDDPMScheduler.from_config(scheduler_config)
    params = {
        "text_encoder": _cast(params["text_encoder"], dtype),
        "unet": _cast(params["unet"], dtype),
        "vae": _cast(params["vae"], dtype),
        "scheduler": scheduler.create_state(),
    }
    return FrozenSD(tokenizer, text_config, unet, vae, scheduler, params, dtype)


# ---------------------------------------------------------------- presets and shipped models

SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
}


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
    unet = FlaxUNet2DConditionModel(in_channels=4, out_channels=4, dtype=DTYPES[dtype], **unet)
    vae = FlaxAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, dtype=DTYPES[dtype], **vae)
    text_module = FlaxCLIPTextModule(config=text_config)
    ids = jnp.zeros((1, MAX_LENGTH), jnp.int32)
    # Diffusers' init_weights takes ~a minute un-jitted even for tiny models; jitted, seconds.
    init = jax.jit(
        lambda key: {
            "text_encoder": text_module.init(jax.random.fold_in(key, 0), ids, ids, ids)["params"],
            "unet": unet.init_weights(jax.random.fold_in(key, 1)),
            "vae": vae.init_weights(jax.random.fold_in(key, 2)),
        }
    )
    params = init(jax.random.PRNGKey(0))
    return _assemble(load_tokenizer(), text_config, unet, vae, SD1_SCHEDULER, params, dtype)


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
            state = safetensors.numpy.load_file(sub / pt_name)
        except (OSError, safetensors.SafetensorError) as err:
            raise UserError(f"{sub / pt_name} is not a readable safetensors file: {err}") from None
        if component == "text_encoder":
            # transformers' own PyTorch->Flax path; it reads safetensors without torch.
            # (Its from_pt needs _do_init=True: it names the converted weights after random ones.)
            try:
                params = FlaxCLIPTextModel.from_pretrained(sub, from_pt=True, local_files_only=True).params
            except ValueError as err:
                raise UserError(f"weights in {sub} do not match its config.json: {err}") from None
        else:
            params = convert.pt_to_flax(state, expected)
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
    text_config = CLIPTextConfig.from_dict({**SD1_TEXT, **configs["text_encoder"]})
    unet = FlaxUNet2DConditionModel.from_config(configs["unet"], dtype=DTYPES[dtype])
    vae = FlaxAutoencoderKL.from_config(configs["vae"], dtype=DTYPES[dtype])
    params = {}
    for name, expected in expected_shapes(text_config, unet, vae).items():
        params[name] = single_file.component_params(state, name, configs[name], expected, path)
        _check_weights(params[name], expected, f"{path} ({name})", "the config stored in it or inferred from it")
    return _assemble(load_tokenizer(), text_config, unet, vae, configs.get("scheduler", SD1_SCHEDULER), params, dtype)


def load_model(path: str | Path, dtype: str = "float32") -> FrozenSD:
    """A preset or shipped model's name, a diffusers-format Stable Diffusion folder (Flax or PyTorch
    safetensors weights), or a single-file SD 1.x checkpoint in the original layout (.safetensors, or
    .ckpt with torch). A folder with a MANIFEST.json has its files' sha256 checked first."""
    if dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if str(path) in PRESETS:
        return PRESETS[str(path)](dtype)
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

    text_config = CLIPTextConfig.from_dict(_read_config(folder / "text_encoder" / "config.json"))
    unet = FlaxUNet2DConditionModel.from_config(_read_config(folder / "unet" / "config.json"), dtype=DTYPES[dtype])
    vae = FlaxAutoencoderKL.from_config(_read_config(folder / "vae" / "config.json"), dtype=DTYPES[dtype])
    params = {name: _read_weights(folder, name, expected)
              for name, expected in expected_shapes(text_config, unet, vae).items()}
    scheduler_config = _read_config(folder / "scheduler" / "scheduler_config.json")
    return _assemble(load_tokenizer(folder / "tokenizer"), text_config, unet, vae, scheduler_config, params, dtype)


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
    model.text_config.save_pretrained(folder / "text_encoder")
    model.scheduler.save_config(folder / "scheduler")
    components = {"text_encoder": None, "unet": model.unet, "vae": model.vae}
    for name, module in components.items():
        sub = folder / name
        params = _cast(model.params[name], jnp.dtype(dtype))
        if module is not None:
            module.save_config(sub)
            if weights == "pt":  # so diffusers' PyTorch classes can read the config too
                config = json.loads((sub / "config.json").read_text())
                config["_class_name"] = PT_CLASS_NAMES[name]
                (sub / "config.json").write_text(json.dumps(config, indent=2))
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


def _public(config) -> dict[str, Any]:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def save_single_file(model: FrozenSD, path: str | Path) -> Path:
    """One original-layout (CompVis/LDM) SD 1.x .safetensors, float32, with our configs in its metadata."""
    path = single_file.check_output(path)
    components = {name: convert.flax_to_pt(jax.device_get(model.params[name])) for name in ("text_encoder", "unet", "vae")}
    configs = {"text_encoder": model.text_config.to_diff_dict(), "unet": _public(model.unet.config),
               "vae": _public(model.vae.config), "scheduler": _public(model.scheduler.config)}
    return single_file.save(path, components, configs)
