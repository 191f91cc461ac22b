import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apl_jax.errors import UserError
from apl_jax.prefix import check_prefix_width, encode_with_prefix, expand_placeholder, init_prefix, single_token_id
from apl_jax.tokenizer import tokenize
from conftest import assert_close

PLACEHOLDER = 41128  # "alz"
K = 10


def official_insert(ids: np.ndarray, embedded: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """The official EmbeddingManager loop, re-done slowly: occurrences right to left,
    each replaced by the K prefix rows, the rest shifted right, truncated to the length."""
    embedded = embedded.copy()
    ids = ids.copy()
    n = ids.shape[1]
    rows, cols = np.nonzero(ids == PLACEHOLDER)
    order = np.argsort(-cols, kind="stable")
    for row, col in zip(rows[order], cols[order]):
        new_ids = np.concatenate([ids[row, :col], np.full(len(prefix), PLACEHOLDER), ids[row, col + 1 :]])[:n]
        new_embedded = np.concatenate([embedded[row, :col], prefix, embedded[row, col + 1 :]])[:n]
        ids[row], embedded[row] = new_ids, new_embedded
    return embedded


PROMPTS = [
    "alz a photo of Tom Cruise",
    "a close-up portrait of alz somebody in a park",  # mid-prompt
    "alz and alz twice",  # two occurrences
    "no placeholder at all",
    "a very long prompt " * 12 + "alz",  # placeholder past the cut: truncated away
    "a long prompt that nearly fills the context " * 4 + "alz the end",  # expansion truncated
]


def test_insertion_matches_official_row_replacement(tiny):
    table = np.asarray(tiny.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    prefix = np.random.default_rng(0).uniform(size=(K, table.shape[1])).astype(np.float32)
    ids = tokenize(tiny.tokenizer, PROMPTS)
    assert (ids == PLACEHOLDER).sum(axis=1).tolist()[:4] == [1, 1, 2, 0]

    expected = official_insert(ids, table[ids], prefix)
    expanded = np.asarray(expand_placeholder(jnp.asarray(ids), PLACEHOLDER, table.shape[0], K))
    ours = np.concatenate([table, prefix])[expanded]
    np.testing.assert_array_equal(ours, expected)
    # and the expansion itself is what the official ids rewrite gives
    assert expanded.shape == ids.shape
    assert expanded[0, :12].tolist() == [49406] + list(range(49408, 49418)) + [320]


def test_expansion_under_jit(tiny):
    ids = jnp.asarray(tokenize(tiny.tokenizer, PROMPTS))
    eager = expand_placeholder(ids, PLACEHOLDER, 49408, K)
    jitted = jax.jit(expand_placeholder, static_argnums=(1, 2, 3))(ids, PLACEHOLDER, 49408, K)
    np.testing.assert_array_equal(eager, jitted)


def test_hidden_states_equal_the_words_the_prefix_spells(tiny):
    """A prefix made of the token rows of "a photo of" must encode "alz cat" like "a photo of cat"."""
    table = tiny.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    words = tokenize(tiny.tokenizer, ["a photo of"])[0, 1:4]
    prefix = table[words]
    with_prefix = jax.jit(lambda p, ids: encode_with_prefix(tiny, tiny.params["text_encoder"], p, ids, PLACEHOLDER))(
        prefix, jnp.asarray(tokenize(tiny.tokenizer, ["alz cat", "a alz dog"]))
    )
    plain = tiny.encode_text(tiny.params["text_encoder"], jnp.asarray(tokenize(tiny.tokenizer, ["a photo of cat", "a a photo of dog"])))
    assert with_prefix.shape == (2, 77, tiny.text_width)
    assert_close(with_prefix, plain, rel=1e-5)


def test_gradient_reaches_prefix_only_through_placeholder(tiny):
    ids = jnp.asarray(tokenize(tiny.tokenizer, ["alz a photo", "a photo"]))

    def total(prefix, row):
        return encode_with_prefix(tiny, tiny.params["text_encoder"], prefix, ids[row : row + 1], PLACEHOLDER).sum()

    prefix = init_prefix(tiny, K, jax.random.PRNGKey(0))
    grad_with = jax.grad(total)(prefix, 0)
    grad_without = jax.grad(total)(prefix, 1)
    assert grad_with.shape == (K, tiny.text_width)
    assert float(jnp.abs(grad_with).sum()) > 0
    assert float(jnp.abs(grad_without).sum()) == 0


def test_init_uniform_and_from_word(tiny):
    prefix = np.asarray(init_prefix(tiny, K, jax.random.PRNGKey(3)))
    assert prefix.shape == (K, tiny.text_width) and prefix.dtype == np.float32
    assert prefix.min() >= 0 and prefix.max() < 1 and prefix.std() > 0.2
    from_word = np.asarray(init_prefix(tiny, 4, jax.random.PRNGKey(3), init_word="person"))
    table = np.asarray(tiny.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(from_word, np.tile(table[2533], (4, 1)))  # "person</w>" is 2533


def test_placeholder_must_be_one_token(tiny):
    assert single_token_id(tiny, "alz") == PLACEHOLDER
    with pytest.raises(UserError, match=r"placeholder 'tom cruise' must be a single CLIP token, but it is 2 tokens"):
        single_token_id(tiny, "tom cruise")
    with pytest.raises(UserError, match=r"prefix.init_word 'anonymization' must be a single CLIP token, but it is 4 tokens"):
        init_prefix(tiny, 2, jax.random.PRNGKey(0), init_word="anonymization")


def test_prefix_width_is_checked(tiny):
    check_prefix_width(tiny, np.zeros((K, tiny.text_width)))
    with pytest.raises(UserError, match=r"prefix has shape \(10, 768\), but the text encoder is 32 wide"):
        check_prefix_width(tiny, np.zeros((10, 768)))


def test_bfloat16_model_keeps_a_small_prefix_step():
    """Under model.dtype bfloat16 the text path stays float32: an Adam-sized step (1e-3) on a prefix element
    near 0.75 is below bfloat16's resolution there (2^-8), yet it changes the encoding."""
    from apl_jax.models import tiny_random

    model = tiny_random("bfloat16")
    assert jnp.bfloat16(0.75 + 1e-3) == jnp.bfloat16(0.75)  # in bfloat16 the step would vanish
    ids = jnp.asarray(tokenize(model.tokenizer, ["alz a photo"]))
    prefix = init_prefix(model, K, jax.random.PRNGKey(0)).at[0, 0].set(0.75)
    encode = jax.jit(lambda p: encode_with_prefix(model, model.params["text_encoder"], p, ids, PLACEHOLDER))
    before, after = encode(prefix), encode(prefix.at[0, 0].add(1e-3))
    assert before.dtype == jnp.float32
    assert float(jnp.abs(after - before).max()) > 1e-5
