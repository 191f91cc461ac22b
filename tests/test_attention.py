"""Attention (apl_jax/nn/attention.py): which kernel is named, and that the result is softmax attention."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apl_jax.nn.attention import cudnn_flash_applies, multi_head_attention



@pytest.mark.parametrize("platform, capability, dtype, head_dim, key_len, expected", [
    ("gpu", "9.0", "bfloat16", 40, 4096, True),    # SD 1.x's first UNet level, self-attention, on an H100/H200
    ("gpu", "9.0", "bfloat16", 160, 64, True),     # its deepest level: over 128 needs Hopper
    ("gpu", "8.0", "bfloat16", 160, 64, False),    # ... so an A100 runs that level on XLA
    ("gpu", "8.0", "float16", 80, 1024, True),
    ("gpu", "9.0", "bfloat16", 40, 77, False),     # cross-attention over 77 tokens: odd, no backward pass
    ("gpu", "9.0", "bfloat16", 512, 4096, False),  # the VAE's single head
    ("gpu", "9.0", "bfloat16", 36, 4096, False),   # not a multiple of 8
    ("gpu", "9.0", "float32", 40, 4096, False),    # the text encoder, and float32 configs
    ("cpu", None, "bfloat16", 40, 4096, False),
    ("gpu", "gfx90a", "bfloat16", 40, 4096, False),  # ROCm: no cuDNN
])
def test_cudnn_flash_attention_is_named_only_where_its_kernel_applies(platform, capability, dtype, head_dim, key_len,
                                                                      expected):
    device = types.SimpleNamespace(platform=platform, compute_capability=capability)
    assert cudnn_flash_applies(jnp.dtype(dtype), head_dim, 4096, key_len, device) is expected


def test_attention_on_this_backend_equals_softmax_by_hand():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 16)) for i in range(3))
    out = multi_head_attention(q, k, v, heads=2, causal=True)
    split = lambda x: x.reshape(2, 5, 2, 8).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(8) + np.triu(np.full((5, 5), -np.inf), 1)
    expected = (jax.nn.softmax(scores, axis=-1) @ split(v)).transpose(0, 2, 1, 3).reshape(2, 5, 16)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_attention_gradient_recomputed_in_the_backward_pass_is_exact():
    """The XLA path keeps q, k, v and recomputes the probabilities backward: gradients equal autodiff's."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 16)) for i in range(3))
    weights = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 16))

    def plain(q, k, v):
        split = lambda x: x.reshape(2, 6, 2, 8)  # noqa: E731
        return jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=True).reshape(2, 6, 16)

    ours = jax.grad(lambda *a: jnp.sum(multi_head_attention(*a, heads=2, causal=True) * weights), argnums=(0, 1, 2))
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) * weights), argnums=(0, 1, 2))
    for got, want in zip(ours(q, k, v), expected(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(want).max() > 0.1
