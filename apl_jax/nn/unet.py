"""UNet2DConditionModel, the Stable Diffusion 1.x/2.x family: cross-attention down/up blocks, plain ResNet
down/up blocks and a cross-attention mid block. Takes and returns NCHW like diffusers; runs NHWC inside."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.errors import UserError
from apl_jax.nn.configs import check_block_types, from_json
from apl_jax.nn.layers import Dense
from apl_jax.nn.resnet import Downsample, ResnetBlock, Upsample, conv3x3
from apl_jax.nn.transformer import SpatialTransformer

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# config.json keys whose other values ask for model code we do not have (SDXL, class embeddings, ...)
SUPPORTED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' misnomer: without num_attention_heads, attention_head_dim is the number of heads
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    transformer_layers_per_block: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        check_block_types("UNet", "down_block_types", self.down_block_types, DOWN_BLOCKS)
        check_block_types("UNet", "up_block_types", self.up_block_types, UP_BLOCKS)
        for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, key), int):
                raise UserError(f"the UNet config's {key} must be one number for this project's model code, "
                                f"got {getattr(self, key)!r}")

    @classmethod
    def from_json(cls, raw) -> "UNetConfig":
        return from_json(cls, raw, "UNet", SUPPORTED)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (the up blocks use them reversed)."""
        heads = self.num_attention_heads or self.attention_head_dim
        return (heads,) * len(self.down_block_types) if isinstance(heads, int) else tuple(heads)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: int) -> jax.Array:
    """Sinusoidal features of the timesteps [B] -> [B, dim], as diffusers' get_timestep_embedding."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class _Block(nn.Module):
    """What the down, mid and up blocks share: their ResNets and (heads > 0) their spatial transformers."""

    config: UNetConfig
    out_channels: int
    heads: int  # 0: a block without attention (DownBlock2D, UpBlock2D)
    dtype: Any = jnp.float32

    def resnet(self, name: str) -> ResnetBlock:
        return ResnetBlock(self.out_channels, self.config.norm_num_groups, self.config.norm_eps, self.dtype, name=name)

    def transformer(self, name: str) -> SpatialTransformer:
        c = self.config
        return SpatialTransformer(self.heads, self.out_channels // self.heads, c.transformer_layers_per_block,
                                  c.use_linear_projection, c.norm_num_groups, self.dtype, name=name)


class DownBlock(_Block):
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, time_embedding, context):
        skips = []
        for j in range(self.config.layers_per_block):
            x = self.resnet(f"resnets_{j}")(x, time_embedding)
            if self.heads:
                x = self.transformer(f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_Block):
    @nn.compact
    def __call__(self, x, time_embedding, context):
        x = self.resnet("resnets_0")(x, time_embedding)
        x = self.transformer("attentions_0")(x, context)
        return self.resnet("resnets_1")(x, time_embedding)


class UpBlock(_Block):
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, time_embedding, context):
        for j, skip in enumerate(reversed(skips)):
            x = self.resnet(f"resnets_{j}")(jnp.concatenate([x, skip], axis=-1), time_embedding)
            if self.heads:
                x = self.transformer(f"attentions_{j}")(x, context)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    dtype: Any = jnp.float32
    # jax.checkpoint each down/mid/up block: its activations are recomputed in the backward pass, not stored
    remat: bool = False

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        """Noise prediction [B, C, H, W] for latents [B, C, H, W], timesteps [B] (or one) and text context [B, T, D]."""
        c = self.config
        down, mid, up = (nn.remat(block) if self.remat else block for block in (DownBlock, MidBlock, UpBlock))
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), sample.shape[:1])
        features = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        width = 4 * c.block_out_channels[0]
        time_embedding = TimestepEmbedding(width, self.dtype, name="time_embedding")(features.astype(self.dtype))

        x = conv3x3(c.block_out_channels[0], self.dtype, "conv_in")(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
        skips = [x]
        last = len(c.block_out_channels) - 1
        for i, (kind, channels) in enumerate(zip(c.down_block_types, c.block_out_channels)):
            heads = c.heads[i] if kind == "CrossAttnDownBlock2D" else 0
            x, block_skips = down(c, channels, heads, self.dtype, add_downsample=i < last, name=f"down_blocks_{i}")(
                x, time_embedding, context)
            skips += block_skips
        x = mid(c, c.block_out_channels[-1], c.heads[-1], self.dtype, name="mid_block")(x, time_embedding, context)
        for i, (kind, channels) in enumerate(zip(c.up_block_types, reversed(c.block_out_channels))):
            heads = c.heads[last - i] if kind == "CrossAttnUpBlock2D" else 0
            block_skips, skips = tuple(skips[-(c.layers_per_block + 1):]), skips[:-(c.layers_per_block + 1)]
            x = up(c, channels, heads, self.dtype, add_upsample=i < last, name=f"up_blocks_{i}")(
                x, block_skips, time_embedding, context)
        x = nn.silu(nn.GroupNorm(c.norm_num_groups, epsilon=c.norm_eps, dtype=self.dtype, name="conv_norm_out")(x))
        x = conv3x3(c.out_channels, self.dtype, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        c = self.config
        size = 2 ** (len(c.block_out_channels) - 1)  # the smallest latents every block can halve
        sample = jnp.zeros((1, c.in_channels, size, size), jnp.float32)
        context = jnp.zeros((1, 1, c.cross_attention_dim), jnp.float32)
        return self.init(rng, sample, jnp.zeros((1,), jnp.int32), context)["params"]


class TimestepEmbedding(nn.Module):
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        hidden = nn.silu(Dense(self.width, dtype=self.dtype, name="linear_1")(features))
        return Dense(self.width, dtype=self.dtype, name="linear_2")(hidden)
