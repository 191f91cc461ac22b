"""The learnable prefix: K vectors in CLIP's token-embedding space, inserted at a placeholder.

Insertion follows the official EmbeddingManager (num_vectors_per_token = K): every
occurrence of the placeholder token is replaced by the K prefix rows, the rest of
the sequence shifts right, and the result is truncated to 77, all before position
embeddings are added. We get that by appending the prefix to the token table as
ids V..V+K-1 and rewriting the ids; the gradient then reaches only those rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apl_jax.errors import UserError
from apl_jax.models import FrozenSD, token_table
from apl_jax.tokenizer import tokenize


def single_token_id(model: FrozenSD, word: str, role: str = "placeholder") -> int:
    """The one CLIP token of `word`; a clear error if it is not exactly one."""
    tokens = model.tokenizer.tokenize(word)
    if len(tokens) != 1:
        raise UserError(f"{role} {word!r} must be a single CLIP token, but it is {len(tokens)} tokens: {tokens}")
    return int(tokenize(model.tokenizer, [word])[0, 1])


def init_prefix(model: FrozenSD, num_vectors: int, rng: jax.Array, init_word: str | None = None) -> jax.Array:
    """[K, D] float32: uniform [0, 1) as the official code, or K copies of a word's token embedding."""
    if num_vectors < 1:
        raise UserError(f"prefix.num_vectors must be at least 1, got {num_vectors}")
    if init_word is None:
        return jax.random.uniform(rng, (num_vectors, model.text_width), jnp.float32)
    token = single_token_id(model, init_word, role="prefix.init_word")
    row = token_table(model.params["text_encoder"])[token].astype(jnp.float32)
    return jnp.tile(row[None], (num_vectors, 1))


def expand_placeholder(ids: jax.Array, placeholder_id: int, first_new_id: int, num_vectors: int) -> jax.Array:
    """Replace each placeholder by ids first_new_id..+K-1, shift the rest right, truncate.

    Works on [..., L] ids under jit: output position j takes the source token whose
    shifted start is the last one <= j.
    """
    length = ids.shape[-1]

    def one_row(row):
        is_placeholder = row == placeholder_id
        # where each source token starts after all earlier placeholders grew by K-1
        starts = jnp.arange(length) + (num_vectors - 1) * (jnp.cumsum(is_placeholder) - is_placeholder)
        source = jnp.searchsorted(starts, jnp.arange(length), side="right") - 1
        offset = jnp.arange(length) - starts[source]
        return jnp.where(is_placeholder[source], first_new_id + offset, row[source])

    flat = ids.reshape(-1, length)
    return jax.vmap(one_row)(flat).reshape(ids.shape).astype(ids.dtype)


def encode_with_prefix(model: FrozenSD, text_params, prefix: jax.Array, ids: jax.Array, placeholder_id: int) -> jax.Array:
    """Final hidden states [B, 77, D] of `ids` with the prefix inserted at the placeholder."""
    expanded = expand_placeholder(ids, placeholder_id, model.vocab_size, prefix.shape[0])
    return model.encode_text(text_params, expanded, extra_embeddings=prefix)


def check_prefix_width(model: FrozenSD, prefix: np.ndarray) -> None:
    if prefix.ndim != 2 or prefix.shape[1] != model.text_width:
        raise UserError(
            f"prefix has shape {tuple(prefix.shape)}, but the text encoder is {model.text_width} wide: "
            f"a prefix must be [K, {model.text_width}] for this model"
        )
