"""Single-file Stable Diffusion 1.x checkpoints in the original (CompVis/LDM) layout: reading, key names, configs.

This is what the official APL code trains against (its ckpt_path) and what AUTOMATIC1111 and
ComfyUI users have: one .safetensors or .ckpt holding the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.`. Names map to diffusers' PyTorch names (and through
convert.py to our Flax params) by one function per component, original_name.

- EMA: a file may also hold EMA copies of the UNet (`model_ema.*`, dots removed). We read the
  `model.diffusion_model.*` weights, as diffusers (by default), AUTOMATIC1111, ComfyUI and the
  official code (use_ema: False) do; EMA-only files already hold the EMA weights there.
- Configs: a file has none. Files we write carry ours in their metadata. For any other file they
  are inferred from tensor shapes (block channels, layers per block, attention levels, cross-attention
  width, text width and depth, VAE channels); what shapes cannot tell takes SD 1.x's values: 8 UNet
  attention heads, CLIP's 64-wide text heads, 32 VAE norm groups, latent scaling 0.18215, 512 px.
  Shapes that rule those values out are an error, not a guess.
- SD 2.x, SDXL and inpainting checkpoints are one-line errors ("not supported yet").
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors
from flax.traverse_util import unflatten_dict

from apl_jax import convert
from apl_jax.errors import UserError
from apl_jax.files import save_safetensors

PREFIXES = {
    "text_encoder": "cond_stage_model.transformer.",
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
}
CONFIG_METADATA = "apl_jax.configs"  # our configs as JSON, in the safetensors metadata of files we write
SUFFIXES = (".safetensors", ".ckpt")

# SD 1.x's values for what tensor shapes do not tell
SD1_IMAGE_SIZE = 512
SD1_UNET_HEADS = 8
CLIP_HEAD_WIDTH = 64
SD1_VAE_GROUPS = 32
SD1_LATENT_SCALING = 0.18215

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
# The VAE's attention projections: linear [C, C] in diffusers, 1x1 convolutions [C, C, 1, 1] in the original
_VAE_ATTENTION_WEIGHT = re.compile(r".*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


# ---------------------------------------------------------------- names

def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_name(name: str, config: Mapping[str, Any]) -> str:
    per_level = config["layers_per_block"] + 1
    module, _, leaf = name.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if match := _UNET_BLOCK.fullmatch(name):
        direction, level, part, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if part == "downsamplers":  # the block after the level's resnets
            return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":  # the level's last block, after its resnet and its attention, if any
            place = 2 if config["up_block_types"][level].startswith("CrossAttn") else 1
            return f"output_blocks.{level * per_level + per_level - 1}.{place}.{rest}"
        blocks, block = (("input_blocks", level * per_level + index + 1) if direction == "down"
                         else ("output_blocks", level * per_level + index))
        if part == "resnets":
            return f"{blocks}.{block}.0.{_rename_first(rest, _UNET_RESNET)}"
        return f"{blocks}.{block}.1.{rest}"
    if match := _UNET_MID.fullmatch(name):
        if match[1] == "resnets":
            return f"middle_block.{2 * int(match[2])}.{_rename_first(match[3], _UNET_RESNET)}"
        return f"middle_block.1.{match[3]}"
    raise ValueError(f"no original-layout name for the UNet param {name}")


def _vae_name(name: str, config: Mapping[str, Any]) -> str:
    levels = len(config["block_out_channels"])
    if match := _VAE_BLOCK.fullmatch(name):
        coder, index, part, item, rest = match[1], int(match[2]), match[3], match[4], match[5]
        # the original decoder counts its levels from the lowest resolution up, diffusers' from the top
        word, level = ("down", index) if coder == "encoder" else ("up", levels - 1 - index)
        if part == "resnets":
            return f"{coder}.{word}.{level}.block.{item}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{coder}.{word}.{level}.{word}sample.{rest}"
    if match := _VAE_MID.fullmatch(name):
        coder, part, item, rest = match[1], match[2], int(match[3]), match[4]
        if part == "resnets":
            return f"{coder}.mid.block_{item + 1}.{_rename_first(rest, {'conv_shortcut': 'nin_shortcut'})}"
        return f"{coder}.mid.attn_1.{_rename_first(rest, _VAE_ATTENTION)}"
    return name.replace(".conv_norm_out.", ".norm_out.")  # conv_in, conv_out, quant_conv... keep their names


def original_name(component: str, name: str, config: Mapping[str, Any]) -> str:
    """The original-layout key of a diffusers (UNet, VAE) or transformers (text encoder) PyTorch name."""
    if component == "unet":
        return PREFIXES["unet"] + _unet_name(name, config)
    if component == "vae":
        return PREFIXES["vae"] + _vae_name(name, config)
    return PREFIXES["text_encoder"] + name


def to_original(components: Mapping[str, Mapping[str, np.ndarray]], configs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{component: PyTorch-named state dict} -> one original-layout state dict."""
    state = {}
    for component, tensors in components.items():
        for name, value in tensors.items():
            if component == "vae" and _VAE_ATTENTION_WEIGHT.fullmatch(name):
                value = value[:, :, None, None]
            state[original_name(component, name, configs[component])] = value
    return state


def component_params(state: Mapping[str, np.ndarray], component: str, config: Mapping[str, Any],
                     expected: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The Flax param tree of one component, named after `expected` (a tree of shapes)."""
    flat = {}
    for name, path in convert.pt_names(expected).items():
        key = original_name(component, name, config)
        if key not in state:
            raise UserError(f"{source} has no {key}: its {component} is not in the SD 1.x layout its shapes suggest")
        value = state[key]
        if component == "vae" and value.ndim == 4 and _VAE_ATTENTION_WEIGHT.fullmatch(name):
            value = value[:, :, 0, 0]
        flat[path] = convert.to_flax_layout(path, value)
    return unflatten_dict(flat)


# ---------------------------------------------------------------- configs

def _indices(shapes: Mapping[str, tuple], prefix: str) -> list[int]:
    """The distinct numbers that follow `prefix` in the keys: the items of a module list."""
    found = {int(key[len(prefix):].split(".", 1)[0]) for key in shapes
             if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return sorted(found)


def _shape_reader(shapes: Mapping[str, tuple], source: Path, prefix: str):
    def shape(key: str) -> tuple:
        if prefix + key not in shapes:
            raise UserError(f"{source} has no {prefix + key}: it is not a Stable Diffusion 1.x checkpoint")
        return tuple(shapes[prefix + key])

    return shape


def _unet_config(shapes: Mapping[str, tuple], source: Path) -> dict[str, Any]:
    prefix = PREFIXES["unet"]
    shape = _shape_reader(shapes, source, prefix)
    in_channels = shape("input_blocks.0.0.weight")[1]
    if in_channels != 4:
        raise UserError(f"{source}: its UNet takes {in_channels} input channels (an inpainting or instruct-pix2pix "
                        "model?); only text-to-image SD 1.x checkpoints (4 channels) are supported yet")
    blocks = _indices(shapes, prefix + "input_blocks.")
    downsamplers = sum(f"{prefix}input_blocks.{b}.0.op.weight" in shapes for b in blocks)
    levels = downsamplers + 1
    # block 0 is conv_in; then per level its resnets and a downsampler, which the last level lacks
    per_level, remainder = divmod(len(blocks), levels)
    if remainder or per_level < 2:
        raise UserError(f"{source}: its UNet's {len(blocks)} input blocks do not form SD 1.x's levels")
    firsts = [level * per_level + 1 for level in range(levels)]  # each level's first resnet block
    channels = [shape(f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in firsts]
    attention = [any(key.startswith(f"{prefix}input_blocks.{b}.1.") for key in shapes) for b in firsts]
    return {
        "sample_size": SD1_IMAGE_SIZE // 2 ** (len(_indices(shapes, PREFIXES["vae"] + "encoder.down.")) - 1),
        "in_channels": in_channels,
        "out_channels": shape("out.2.weight")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": channels,
        "layers_per_block": per_level - 1,
        "attention_head_dim": SD1_UNET_HEADS,  # diffusers' SD 1.x configs put the head count under this name
        "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "use_linear_projection": len(shape("middle_block.1.proj_in.weight")) == 2,
        "transformer_layers_per_block": len(_indices(shapes, prefix + "middle_block.1.transformer_blocks.")),
    }


def _unsure(source: Path, what: str) -> UserError:
    return UserError(f"{source}: {what}, and the file holds no config to say otherwise "
                     "(files written by `python -m apl_jax.export model --format single-file` do)")


def _vae_config(shapes: Mapping[str, tuple], source: Path) -> dict[str, Any]:
    shape = _shape_reader(shapes, source, PREFIXES["vae"])
    levels = _indices(shapes, PREFIXES["vae"] + "encoder.down.")
    channels = [shape(f"encoder.down.{level}.block.0.conv2.weight")[0] for level in levels]
    if any(c % SD1_VAE_GROUPS for c in channels):
        raise _unsure(source, f"its VAE's channels {channels} are not multiples of SD 1.x's {SD1_VAE_GROUPS} norm groups")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, PREFIXES["vae"] + "encoder.down.0.block.")),
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": SD1_VAE_GROUPS,
        "sample_size": SD1_IMAGE_SIZE,
        "scaling_factor": SD1_LATENT_SCALING,
    }


def _text_config(shapes: Mapping[str, tuple], source: Path) -> dict[str, Any]:
    prefix = PREFIXES["text_encoder"] + "text_model."
    shape = _shape_reader(shapes, source, prefix)
    vocab_size, width = shape("embeddings.token_embedding.weight")
    if width % CLIP_HEAD_WIDTH:
        raise _unsure(source, f"its text encoder's width {width} is not a multiple of CLIP's {CLIP_HEAD_WIDTH}-wide heads")
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": len(_indices(shapes, prefix + "encoder.layers.")),
        "num_attention_heads": width // CLIP_HEAD_WIDTH,
        "max_position_embeddings": shape("embeddings.position_embedding.weight")[0],
        "projection_dim": width,
    }


def infer_configs(shapes: Mapping[str, tuple], source: Path) -> dict[str, dict[str, Any]]:
    """Configs of the text encoder, UNet and VAE from an original-layout file's tensor shapes."""
    return {"text_encoder": _text_config(shapes, source), "unet": _unet_config(shapes, source),
            "vae": _vae_config(shapes, source)}


# ---------------------------------------------------------------- files

class _LightningCheckpointCallback:
    """Stands in for pytorch_lightning's ModelCheckpoint class: SD 1.x .ckpt files key their training
    callbacks' state by it. Weights-only loading may resolve that one name, to this inert class."""


_LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


def _load_ckpt(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path.name} needs torch: pip install torch (the CPU build is enough), "
                        "or use the model as .safetensors") from None
    # Never weights_only=False: a .ckpt is a pickle, and that would run any code in it.
    with torch.serialization.safe_globals([(_LightningCheckpointCallback, _LIGHTNING_CALLBACK)]):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise UserError(f"{path} is not a checkpoint torch's weights-only loader reads: {reason}") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a state dict")
    return {key: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
            for key, value in data.items() if isinstance(value, torch.Tensor)}


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if path.suffix == ".ckpt":
        return _load_ckpt(path), {}
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors file: {err}") from None


def _check_family(keys: set[str], path: Path) -> None:
    if any(key.startswith("conditioner.embedders.") for key in keys):
        raise UserError(f"{path} is an SDXL checkpoint; SDXL is not supported yet (only SD 1.x)")
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        raise UserError(f"{path} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); SD 2.x is not "
                        "supported yet (only SD 1.x)")
    missing = [f"{component} ({prefix}*)" for component, prefix in PREFIXES.items()
               if not any(key.startswith(prefix) for key in keys)]
    if missing:
        raise UserError(f"{path} is not a Stable Diffusion 1.x checkpoint: it has no {', '.join(missing)} weights")


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(original-layout state dict, configs) of a single-file SD 1.x checkpoint."""
    path = Path(path)
    state, metadata = _load(path)
    text = PREFIXES["text_encoder"]
    if not any(key.startswith(text + "text_model.") for key in state):
        # files from before transformers' CLIPTextModel kept its modules under text_model.
        state = {text + "text_model." + key[len(text):] if key.startswith(text) else key: value
                 for key, value in state.items()}
    _check_family(set(state), path)
    if CONFIG_METADATA in metadata:
        configs = json.loads(metadata[CONFIG_METADATA])
    else:
        configs = infer_configs({key: value.shape for key, value in state.items()}, path)
    return state, configs


def check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"a single-file model is written as .safetensors, not {path.name}")
    return path


def save(path: str | Path, components: Mapping[str, Mapping[str, np.ndarray]], configs: Mapping[str, Any]) -> Path:
    """One original-layout .safetensors, with `configs` (text_encoder, unet, vae, scheduler) in its metadata."""
    return save_safetensors(path, to_original(components, configs),
                            metadata={"format": "pt", CONFIG_METADATA: json.dumps(configs)})
