"""The UNet's attention blocks (diffusers' Transformer2DModel): self-attention, cross-attention to the text, GEGLU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.nn.attention import multi_head_attention
from apl_jax.nn.backward import recomputed
from apl_jax.nn.layers import Conv, Dense


class Attention(nn.Module):
    """Self-attention (no context) or cross-attention; the projections have no bias, the output has one."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        out = multi_head_attention(q, k, v, self.heads)
        return Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Only the projection is kept for the backward pass, which recomputes the GELU (elementwise)
        return recomputed(_gated_gelu)(Dense(2 * self.width, dtype=self.dtype, name="proj")(x))


def _gated_gelu(projected: jax.Array) -> jax.Array:
    hidden, gate = jnp.split(projected, 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)  # PyTorch's exact GELU, not flax's tanh default


class FeedForward(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        return Dense(width, dtype=self.dtype, name="net_2")(GEGLU(4 * width, self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
    heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)

        x = x + Attention(self.heads, self.head_dim, self.dtype, name="attn1")(norm("norm1")(x))
        x = x + Attention(self.heads, self.head_dim, self.dtype, name="attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """Group norm, a projection in (1x1 conv, or linear as in SD 2.x), `depth` transformer blocks over the
    H x W positions, a projection out; added to the input."""

    heads: int
    head_dim: int
    depth: int
    use_linear_projection: bool
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, height * width, channels))
        else:
            h = Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(batch, height * width, inner)
        for i in range(self.depth):
            h = TransformerBlock(self.heads, self.head_dim, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(batch, height, width, channels)
        else:
            h = Conv(channels, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(batch, height, width, inner))
        return x + h
