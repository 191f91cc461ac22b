"""Dense and Conv layers; on XLA's CPU backend, convolutions over few positions run as patch matmuls.

XLA's CPU convolution is fast where there are many positions per channel (the VAE at full
resolution) and slow where there are few (the UNet's inner blocks: 8 x 8 positions of 1280
channels at 256 px). There its input gradient is slower still, because it first makes a spatially
reversed, transposed copy of the weight. Written as a matmul of the input's patches with the
weight, the same convolution is 1.4-2.6x faster forward and 1.1-6.8x faster in the input gradient
on two CPU cores, and the gradient reads the weight in place (`benchmarks/conv_paths.py` measures
every case; `FORWARD_PATCH_ROWS`/`BACKWARD_PATCH_ROWS` are where the two paths cross).

Where the backward pass stays on XLA's convolution, each weight is tied to the incoming cotangent
(`backward.tied`): its reversed copy depends only on the weight, so XLA's CPU scheduler would
otherwise make every layer's copy at the start of the backward pass and keep them all alive at once.
Values and gradients are the same on either path; a weight gradient, where one is taken (APL-mini's
build trains these layers), is exact.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from apl_jax.nn.backward import tied

# A convolution runs as a patch matmul on CPU while (batch x output positions) <= this many times its
# input channels: forward and input gradient cross over at different points (benchmarks/conv_paths.py).
FORWARD_PATCH_ROWS = 1.0
BACKWARD_PATCH_ROWS = 8.0

NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax's layout, as lax.ConvDimensionNumbers specs


def patches(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int], padding) -> jax.Array:
    """[B, Ho, Wo, kh*kw*C]: each output position's input window, flattened in the weight's (HWI) order."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    return jnp.concatenate([xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw]
                            for i in range(kh) for j in range(kw)], axis=-1)


def patch_conv(x, w, strides, padding, precision=None, preferred_element_type=None):
    """An NHWC x HWIO convolution (no dilation, one group) as patches @ weight."""
    return lax.dot_general(patches(x, w.shape[:2], strides, padding), w.reshape(-1, w.shape[-1]),
                           (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred_element_type)


def _xla_conv(x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
              precision, preferred_element_type):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)


def use_patches(x_shape, w_shape, static, rows_per_channel: float, backend: str | None = None) -> bool:
    """Whether this convolution runs as a patch matmul on `backend` (default: JAX's) at this threshold."""
    strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups = static[:6]
    if (backend or jax.default_backend()) != "cpu" or groups != 1 or {lhs_dilation, rhs_dilation} - {None, (1, 1)}:
        return False
    if (tuple(dimension_numbers.lhs_spec), tuple(dimension_numbers.rhs_spec), tuple(dimension_numbers.out_spec)) != NHWC_HWIO:
        return False
    positions = [(size + low + high - k) // stride + 1
                 for size, (low, high), k, stride in zip(x_shape[1:3], padding, w_shape[:2], strides)]
    return x_shape[0] * positions[0] * positions[1] <= rows_per_channel * x_shape[-1]


def _conv_value(x, w, *static):
    if use_patches(x.shape, w.shape, static, FORWARD_PATCH_ROWS):
        return patch_conv(x, w, static[0], static[1], *static[6:])
    return _xla_conv(x, w, *static)


_conv = jax.custom_vjp(_conv_value, nondiff_argnums=tuple(range(2, 10)))


def _conv_fwd(x, w, *static):
    return _conv(x, w, *static), (x, w)


def _conv_bwd(*arguments):
    *static, (x, w), g = arguments
    if use_patches(x.shape, w.shape, static, BACKWARD_PATCH_ROWS):
        _, vjp = jax.vjp(lambda x, w: patch_conv(x, w, static[0], static[1], *static[6:]), x, w)
    else:
        _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, *static), x, tied(w, g))
    return vjp(g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _tuple(value):
    return None if value is None else tuple(value)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """lax.conv_general_dilated, with the signature flax's Conv calls."""
    if batch_group_count != 1:
        raise NotImplementedError("batch_group_count > 1")  # flax's Conv never asks for it
    strides = tuple(window_strides)
    dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if isinstance(padding, str):  # "SAME"/"VALID" as explicit pairs, which the patch path needs
        spatial = [lhs.shape[d] for d in dimension_numbers.lhs_spec[2:]]
        padding = lax.padtype_to_pads(spatial, [rhs.shape[d] for d in dimension_numbers.rhs_spec[2:]], strides, padding)
    return _conv(lhs, rhs, strides, tuple(tuple(p) for p in padding), _tuple(lhs_dilation), _tuple(rhs_dilation),
                 dimension_numbers, feature_group_count, precision, preferred_element_type)


# Dense needs no such care: its input gradient reads the weight in place (XLA's memory analysis of the
# sd15@256 step showed the same temporaries with and without tying it, in either pass layout).
Dense = nn.Dense
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
