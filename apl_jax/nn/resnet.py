"""The convolutional pieces the UNet and the VAE share: residual blocks and 2x up/down sampling (NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.nn.layers import Conv, Dense


def conv3x3(features: int, dtype: Any, name: str, strides: int = 1, padding: Any = ((1, 1), (1, 1))) -> Conv:
    return Conv(features, (3, 3), strides=(strides, strides), padding=padding, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the time embedding in the UNet's blocks; a 1x1 shortcut where widths change."""

    out_channels: int
    groups: int
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, time_embedding: jax.Array | None = None) -> jax.Array:
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        if time_embedding is not None:
            h = h + Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(time_embedding))[:, None, None]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """A stride-2 3x3 conv. The UNet pads 1 on every side; the VAE pads only bottom and right (`vae_padding`)."""

    channels: int
    vae_padding: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.vae_padding else ((1, 1), (1, 1))
        return conv3x3(self.channels, self.dtype, "conv", strides=2, padding=padding)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, self.dtype, "conv")(x)
