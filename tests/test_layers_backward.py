"""apl_jax.nn.layers: the same values and gradients as flax's Dense/Conv, with less backward memory;
the patch-matmul convolution against XLA's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from apl_jax.nn import layers
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


@functools.lru_cache
def stacks(size):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, size, size, 128))
    context = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 32))
    ours, theirs = Stack(Dense, Conv), Stack(nn.Dense, nn.Conv)
    params = jax.jit(theirs.init)(jax.random.PRNGKey(2), x, context)
    return ours, theirs, params, x, context


@pytest.fixture(scope="module", params=[8, 16, 48], ids=["patches", "patch-backward", "xla"])
def setup(request):
    """8 x 8 positions of 128 channels run as patch matmuls both ways, 16 x 16 in the backward pass
    only, 48 x 48 on XLA's convolution (test_paths_taken checks that)."""
    return stacks(request.param)


def test_same_value_and_gradients(setup):
    ours, theirs, params, x, context = setup
    grad = lambda module: jax.jit(jax.value_and_grad(module.apply, argnums=(0, 1, 2)))(params, x, context)
    (value, grads), (want_value, want_grads) = grad(ours), grad(theirs)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # weights, input and context
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_paths_taken(setup):
    _, _, _, x, _ = setup
    static = ((1, 1), ((1, 1), (1, 1)), None, None, lax.ConvDimensionNumbers(*layers.NHWC_HWIO), 1)
    taken = [layers.use_patches(x.shape, (3, 3, 128, 128), static, rows)
             for rows in (layers.FORWARD_PATCH_ROWS, layers.BACKWARD_PATCH_ROWS)]
    assert taken == {8: [True, True], 16: [False, True], 48: [False, False]}[x.shape[1]]
    assert not layers.use_patches(x.shape, (3, 3, 128, 128), static, layers.BACKWARD_PATCH_ROWS, backend="gpu")


@pytest.mark.parametrize("kernel, strides, padding", [
    ((3, 3), (1, 1), ((1, 1), (1, 1))),  # the resnets' convolutions
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # the UNet's downsampler
    ((3, 3), (2, 2), ((0, 1), (0, 1))),  # the VAE's downsampler pads bottom and right only
    ((1, 1), (1, 1), ((0, 0), (0, 0))),  # shortcuts and projections
    ((4, 4), (4, 4), ((0, 0), (0, 0))),  # a ViT's patch embedding
])
def test_patch_conv_matches_xla(kernel, strides, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 5))
    w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, 5, 7))
    dimension_numbers = ("NHWC", "HWIO", "NHWC")

    def xla(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dimension_numbers)

    want, want_vjp = jax.vjp(xla, x, w)
    got, got_vjp = jax.vjp(lambda x, w: layers.patch_conv(x, w, strides, padding), x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), want.shape)
    for g, h in zip(got_vjp(cotangent), want_vjp(cotangent)):  # input and weight gradients
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("patch_rows", [layers.BACKWARD_PATCH_ROWS, 0.0], ids=["patches", "xla-tied"])
def test_input_gradient_keeps_fewer_weight_copies(patch_rows, monkeypatch):
    """The input gradient alone (APL's case: frozen weights) needs less temporary memory than with flax's
    layers, on either path (8 x 8 positions, where the weights dominate the temporaries)."""
    monkeypatch.setattr(layers, "FORWARD_PATCH_ROWS", min(patch_rows, layers.FORWARD_PATCH_ROWS))
    monkeypatch.setattr(layers, "BACKWARD_PATCH_ROWS", patch_rows)
    ours, theirs, params, x, context = stacks(8)

    def temp_bytes(module):
        grad = jax.jit(jax.grad(lambda context, params: module.apply(params, x, context)))
        return grad.lower(context, params).compile().memory_analysis().temp_size_in_bytes

    weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert temp_bytes(theirs) > 0.7 * weight_bytes  # (nearly) every transposed weight alive at once
    assert temp_bytes(ours) < 0.4 * temp_bytes(theirs)  # about one weight copy at a time
