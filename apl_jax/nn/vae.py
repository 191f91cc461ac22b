"""AutoencoderKL, Stable Diffusion's VAE: images (NCHW, [-1, 1]) <-> latents, with the posterior's mean and std."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.nn.attention import multi_head_attention
from apl_jax.nn.configs import check_block_types, from_json
from apl_jax.nn.layers import Conv, Dense
from apl_jax.nn.resnet import Downsample, ResnetBlock, Upsample, conv3x3

EPS = 1e-6  # every VAE norm's epsilon
SUPPORTED = {
    "act_fn": ("silu",),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215

    def __post_init__(self):
        check_block_types("VAE", "down_block_types", self.down_block_types, ("DownEncoderBlock2D",))
        check_block_types("VAE", "up_block_types", self.up_block_types, ("UpDecoderBlock2D",))

    @classmethod
    def from_json(cls, raw) -> "VAEConfig":
        return from_json(cls, raw, "VAE", SUPPORTED)


class SelfAttention(nn.Module):
    """One-head attention over the H x W positions, added to the input (the VAE's mid block)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = nn.GroupNorm(self.groups, epsilon=EPS, dtype=self.dtype, name="group_norm")(x).reshape(batch, -1, channels)
        q, k, v = (Dense(channels, dtype=self.dtype, name=name)(h) for name in ("query", "key", "value"))
        out = Dense(channels, dtype=self.dtype, name="proj_attn")(multi_head_attention(q, k, v, heads=1))
        return x + out.reshape(x.shape)


class MidBlock(nn.Module):
    channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.groups, EPS, self.dtype, name="resnets_0")(x)
        x = SelfAttention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, EPS, self.dtype, name="resnets_1")(x)


class Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: ResNets, then a 2x down- or upsampling (none in the last block)."""

    channels: int
    layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.layers):
            x = ResnetBlock(self.channels, self.groups, EPS, self.dtype, name=f"resnets_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.channels, vae_padding=True, dtype=self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
        return x


def _norm_out(x: jax.Array, groups: int, dtype: Any) -> jax.Array:
    return nn.silu(nn.GroupNorm(groups, epsilon=EPS, dtype=dtype, name="conv_norm_out")(x))


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> posterior moments [B, h, w, 2 x latent channels]."""
        c, groups, last = self.config, self.config.norm_num_groups, len(self.config.block_out_channels) - 1
        x = conv3x3(c.block_out_channels[0], self.dtype, "conv_in")(x)
        for i, channels in enumerate(c.block_out_channels):
            resample = "down" if i < last else None
            x = Block(channels, c.layers_per_block, groups, resample, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(c.block_out_channels[-1], groups, self.dtype, name="mid_block")(x)
        return conv3x3(2 * c.latent_channels, self.dtype, "conv_out")(_norm_out(x, groups, self.dtype))


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Latents [B, h, w, C] -> images [B, H, W, 3]."""
        c, groups, last = self.config, self.config.norm_num_groups, len(self.config.block_out_channels) - 1
        x = conv3x3(c.block_out_channels[-1], self.dtype, "conv_in")(z)
        x = MidBlock(c.block_out_channels[-1], groups, self.dtype, name="mid_block")(x)
        for i, channels in enumerate(reversed(c.block_out_channels)):
            resample = "up" if i < last else None
            x = Block(channels, c.layers_per_block + 1, groups, resample, self.dtype, name=f"up_blocks_{i}")(x)
        return conv3x3(c.out_channels, self.dtype, "conv_out")(_norm_out(x, groups, self.dtype))


class AutoencoderKL(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype)
        self.quant_conv = Conv(2 * self.config.latent_channels, (1, 1), dtype=self.dtype)
        self.post_quant_conv = Conv(self.config.latent_channels, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(self.config, self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior (mean, std), channels-last [B, h, w, C], of images [B, 3, H, W] in [-1, 1]."""
        moments = self.quant_conv(self.encoder(jnp.transpose(images, (0, 2, 3, 1)).astype(self.dtype)))
        mean, log_variance = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(log_variance, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Images [B, 3, H, W] (about [-1, 1]) from unscaled latents [B, C, h, w]."""
        z = self.post_quant_conv(jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype))
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Encode then decode the posterior mean: touches every param, for init."""
        mean, _ = self.encode(images)
        return self.decode(jnp.transpose(mean, (0, 3, 1, 2)))

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        size = 2 ** (len(self.config.block_out_channels) - 1)
        return self.init(rng, jnp.zeros((1, self.config.in_channels, size, size), jnp.float32))["params"]
