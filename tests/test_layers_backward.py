"""apl_jax.nn.layers: the same values and gradients as flax's Dense/Conv, with less backward memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apl_jax.nn.layers import Conv, Dense


class Stack(nn.Module):
    """Convs and dense layers as in a UNet block, built from either flax's layers or ours."""
    dense: type
    conv: type
    depth: int = 6

    @nn.compact
    def __call__(self, x, context):
        for i in range(self.depth):
            x = jnp.tanh(self.conv(128, (3, 3), padding=1, name=f"conv_{i}")(x))
            x = x + self.dense(128, name=f"dense_{i}")(context).mean(axis=1)[:, None, None]
            x = jnp.tanh(self.conv(128, (1, 1), strides=(2, 2) if i == 1 else (1, 1), name=f"proj_{i}")(x))
        return (x ** 2).sum()


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 128))
    context = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 32))
    ours, theirs = Stack(Dense, Conv), Stack(nn.Dense, nn.Conv)
    params = jax.jit(theirs.init)(jax.random.PRNGKey(2), x, context)
    return ours, theirs, params, x, context


def test_same_value_and_gradients(setup):
    ours, theirs, params, x, context = setup
    grad = lambda module: jax.jit(jax.value_and_grad(module.apply, argnums=(0, 1, 2)))(params, x, context)
    (value, grads), (want_value, want_grads) = grad(ours), grad(theirs)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # weights, input and context
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_input_gradient_keeps_fewer_weight_copies(setup):
    """The input gradient alone (APL's case: frozen weights) needs less temporary memory than with flax's layers."""
    ours, theirs, params, x, context = setup

    def temp_bytes(module):
        grad = jax.jit(jax.grad(lambda context, params: module.apply(params, x, context)))
        return grad.lower(context, params).compile().memory_analysis().temp_size_in_bytes

    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert temp_bytes(theirs) > 0.7 * weight_bytes  # (nearly) every transposed weight alive at once
    assert temp_bytes(ours) < 0.4 * temp_bytes(theirs)  # about one weight copy at a time
