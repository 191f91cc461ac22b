"""CLIP: the text transformer (Stable Diffusion's text encoder: final hidden states after the last layer norm),
and the full model with its vision transformer and projections (CLIP score, clip_score.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from apl_jax.nn.attention import multi_head_attention
from apl_jax.nn.configs import from_json
from apl_jax.nn.layers import Conv, Dense

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
SUPPORTED = {"hidden_act": tuple(ACTIVATIONS)}


@dataclasses.dataclass(frozen=True)
class _TowerConfig:
    """What the text and the vision transformer share; defaults are transformers' (text: CLIP ViT-B/32's)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_json(cls, raw):
        return from_json(cls, raw, cls.COMPONENT, SUPPORTED)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_TowerConfig):
    COMPONENT: ClassVar[str] = "text encoder"
    vocab_size: int = 49408
    projection_dim: int = 512
    max_position_embeddings: int = 77
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_TowerConfig):
    COMPONENT: ClassVar[str] = "CLIP vision"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_json(cls, raw) -> "CLIPConfig":
        """A transformers CLIPModel config.json: text_config and vision_config hold what differs from the defaults."""
        return cls(CLIPTextConfig.from_json(raw.get("text_config") or {}),
                   CLIPVisionConfig.from_json(raw.get("vision_config") or {}), raw.get("projection_dim", 512))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, both residual."""

    config: "CLIPTextConfig | CLIPVisionConfig"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        c = self.config
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm1")(x)
        x = x + SelfAttention(c.num_attention_heads, name="self_attn")(h, causal)
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm2")(x)
        return x + MLP(c.intermediate_size, c.hidden_act, name="mlp")(h)


class SelfAttention(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        width = x.shape[-1]
        q, k, v = (Dense(width, name=name)(x) for name in ("q_proj", "k_proj", "v_proj"))
        return Dense(width, name="out_proj")(multi_head_attention(q, k, v, self.heads, causal=causal))


class MLP(nn.Module):
    intermediate_size: int
    activation: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = ACTIVATIONS[self.activation](Dense(self.intermediate_size, name="fc1")(x))
        return Dense(x.shape[-1], name="fc2")(hidden)


class Encoder(nn.Module):
    """The layer stack of either tower; its params live under encoder/layers/<i>, as transformers names them."""

    config: "CLIPTextConfig | CLIPVisionConfig"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        return LayerStack(self.config, name="layers")(x, causal)


class LayerStack(nn.Module):
    config: "CLIPTextConfig | CLIPVisionConfig"

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, name=str(i))(x, causal)
        return x


class TokenEmbedding(nn.Module):
    """The token table, optionally with extra rows appended (a learned prefix becomes ids V..V+K-1)."""

    vocab_size: int
    width: int

    @nn.compact
    def __call__(self, ids: jax.Array, extra_rows: jax.Array | None = None) -> jax.Array:
        table = self.param("embedding", nn.initializers.normal(0.02), (self.vocab_size, self.width))
        if extra_rows is None:
            return jnp.take(table, ids, axis=0)
        # Each source gathered on its own: appending the rows to the table would copy all 49,408 rows
        # on every call, and the prefix's gradient would be scattered into a zero table that size.
        tokens = jnp.take(table, jnp.minimum(ids, self.vocab_size - 1), axis=0)
        extra = jnp.take(extra_rows.astype(table.dtype), jnp.clip(ids - self.vocab_size, 0, len(extra_rows) - 1), axis=0)
        return jnp.where((ids >= self.vocab_size)[..., None], extra, tokens)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        c = self.config
        x = TextEmbeddings(c, name="embeddings")(ids, extra_embeddings)
        x = Encoder(c, name="encoder")(x, causal=True)
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


class VisionEmbeddings(nn.Module):
    """Non-overlapping patches (a strided conv) behind a learned class token, plus position embeddings."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        patch = (c.patch_size, c.patch_size)
        x = Conv(c.hidden_size, patch, strides=patch, padding="VALID", use_bias=False, name="patch_embedding")(
            jnp.transpose(pixels, (0, 2, 3, 1)))
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        class_token = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(class_token, (x.shape[0], 1, c.hidden_size)), x], axis=1)
        positions = nn.Embed(x.shape[1], c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                             name="position_embedding")(jnp.arange(x.shape[1]))
        return x + positions


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """The pooled output (the class token's final state, layer-normed) of pixels [B, 3, S, S]."""
        c = self.config
        x = VisionEmbeddings(c, name="embeddings")(pixels)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="pre_layrnorm")(x)  # sic: transformers' name
        x = Encoder(c, name="encoder")(x, causal=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """Text and image features in CLIP's shared space (not normalised)."""

    config: CLIPConfig

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config.text)
        self.vision_model = CLIPVisionTransformer(self.config.vision)
        self.text_projection = Dense(self.config.projection_dim, use_bias=False)
        self.visual_projection = Dense(self.config.projection_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def text_features(self, ids: jax.Array) -> jax.Array:
        hidden = self.text_model(ids)
        # the EOS token's state; EOS has the largest id, so argmax finds the first one
        return self.text_projection(hidden[jnp.arange(ids.shape[0]), jnp.argmax(ids, axis=-1)])

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels))

    def __call__(self, ids: jax.Array, pixels: jax.Array):
        return self.text_features(ids), self.image_features(pixels), self.logit_scale

    def init_weights(self, rng: jax.Array) -> dict[str, Any]:
        c = self.config
        ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
        pixels = jnp.zeros((1, c.vision.num_channels, c.vision.image_size, c.vision.image_size), jnp.float32)
        return self.init(rng, ids, pixels)["params"]
