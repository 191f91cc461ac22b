"""The CLIP text transformer (Stable Diffusion's text encoder): final hidden states after the last layer norm."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.nn.attention import multi_head_attention
from apl_jax.nn.configs import from_json

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
SUPPORTED = {"hidden_act": tuple(ACTIVATIONS)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_json(cls, raw) -> "CLIPTextConfig":
        return from_json(cls, raw, "text encoder", SUPPORTED)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, both residual."""

    heads: int
    intermediate_size: int
    activation: str
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        width = x.shape[-1]
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm1")(x)
        x = x + SelfAttention(self.heads, name="self_attn")(h, causal)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm2")(x)
        return x + MLP(self.intermediate_size, width, self.activation, name="mlp")(h)


class SelfAttention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        width = x.shape[-1]
        q, k, v = (nn.Dense(width, name=name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        return nn.Dense(width, name="out_proj")(multi_head_attention(q, k, v, self.heads, causal=causal))


class MLP(nn.Module):
    intermediate_size: int
    width: int
    activation: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ACTIVATIONS[self.activation](nn.Dense(self.intermediate_size, name="fc1")(x))
        return nn.Dense(self.width, name="fc2")(x)


class Encoder(nn.Module):
    """The layer stack; its params live under encoder/layers/<i>, as transformers names them."""

    layers: int
    heads: int
    intermediate_size: int
    activation: str
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        stack = LayerStack(self.layers, self.heads, self.intermediate_size, self.activation, self.eps, name="layers")
        return stack(x, causal)


class LayerStack(nn.Module):
    layers: int
    heads: int
    intermediate_size: int
    activation: str
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        for i in range(self.layers):
            x = EncoderLayer(self.heads, self.intermediate_size, self.activation, self.eps, name=str(i))(x, causal)
        return x


class TokenEmbedding(nn.Module):
    """The token table, optionally with extra rows appended (a learned prefix becomes ids V..V+K-1)."""

    vocab_size: int
    width: int

    @nn.compact
    def __call__(self, ids: jax.Array, extra_rows: jax.Array | None = None) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(0.02), (self.vocab_size, self.width))
        if extra_rows is not None:
            table = jnp.concatenate([table, extra_rows.astype(table.dtype)], axis=0)
        return jnp.take(table, ids, axis=0)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        c = self.config
        x = TextEmbeddings(c, name="embeddings")(ids, extra_embeddings)
        x = Encoder(c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                    name="encoder")(x, causal=True)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_layer_norm")(x)


class TextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids: jax.Array, extra_embeddings: jax.Array | None) -> jax.Array:
        c = self.config
        tokens = TokenEmbedding(c.vocab_size, c.hidden_size, name="token_embedding")(ids, extra_embeddings)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                             name="position_embedding")(jnp.arange(ids.shape[-1]))
        return tokens + positions


class CLIPTextModel(nn.Module):
    """Float32 always, whatever model.dtype says: a 1e-3 step of the prefix must reach the UNet (docs/design.md)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        """Final hidden states [B, T, D] of token ids [B, T]; `extra_embeddings` [K, D] are the ids V..V+K-1."""
        return CLIPTextTransformer(self.config, name="text_model")(ids, extra_embeddings)

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return self.init(rng, ids)["params"]
