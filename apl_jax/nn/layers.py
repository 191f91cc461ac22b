"""Dense and Conv layers whose backward pass makes each weight's transposed copy just in time.

The input gradient of `x @ w` or of a convolution reads the weight transposed (and, for a
convolution, spatially reversed). XLA's CPU backend materialises that copy, and since the copy
depends on the weight alone, its scheduler computes every layer's copy at the start of the
backward pass: the copies of all the frozen weights are alive at once (3.1 GiB of temporaries for
the input gradient of SD 1.5's UNet at 256 px). Tying each weight to the incoming cotangent
(w + 0 * g[0]) makes the copy depend on it, so it is made right before its use and freed right
after (0.9 GiB for the same gradient). Values and gradients are unchanged; a weight gradient, where
one is taken (APL-mini's build trains these layers), is still exact.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax

from apl_jax.nn.backward import tied


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dot(x, w, dimension_numbers, precision, preferred_element_type):
    return lax.dot_general(x, w, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type)


def _dot_fwd(x, w, dimension_numbers, precision, preferred_element_type):
    return _dot(x, w, dimension_numbers, precision, preferred_element_type), (x, w)


def _dot_bwd(dimension_numbers, precision, preferred_element_type, residuals, g):
    x, w = residuals
    _, vjp = jax.vjp(functools.partial(lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type), x, tied(w, g))
    return vjp(g)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general (flax's Dense calls it with these arguments); hashable arguments for custom_vjp."""
    dims = tuple(tuple(tuple(axes) for axes in pair) for pair in dimension_numbers)
    return _dot(lhs, rhs, dims, precision, preferred_element_type)


def _plain_conv(x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                precision, preferred_element_type):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)


_conv = jax.custom_vjp(_plain_conv, nondiff_argnums=tuple(range(2, 10)))


def _conv_fwd(x, w, *static):
    return _conv(x, w, *static), (x, w)


def _conv_bwd(*arguments):
    *static, (x, w), g = arguments
    _, vjp = jax.vjp(lambda x, w: _plain_conv(x, w, *static), x, tied(w, g))
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
    padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    return _conv(lhs, rhs, tuple(window_strides), padding, _tuple(lhs_dilation), _tuple(rhs_dilation),
                 dimension_numbers, feature_group_count, precision, preferred_element_type)


Dense = functools.partial(nn.Dense, dot_general=dot_general)
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
