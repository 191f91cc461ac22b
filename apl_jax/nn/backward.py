"""Backward-pass values made just in time: `tied` and `recomputed`, for XLA's CPU scheduler.

XLA schedules a value as soon as its inputs exist. In a backward pass, anything computed from
forward values or frozen weights alone (a weight's transposed copy, recomputed attention
probabilities) has its inputs from the start, so the CPU scheduler computes all of them there and
keeps them alive at once. Making such a value depend on the incoming cotangent (plus zero) moves it
to right before its use. Values and gradients are unchanged.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def tied(value: jax.Array, cotangent: jax.Array) -> jax.Array:
    """`value`, made to depend on `cotangent`: XLA can compute from it only once the backward pass is there."""
    # A NaN or Inf cotangent already makes every gradient non-finite; the NaN guard sees it either way.
    return value + jnp.zeros((), value.dtype) * cotangent.ravel()[0].astype(value.dtype)


def recomputed(fn: Callable) -> Callable:
    """`fn`, keeping only its inputs for the backward pass, which recomputes its intermediates just in time.

    For cheap functions with large intermediates: attention's heads x T x T probabilities, the GEGLU's
    GELU. The gradient is exact (the same computation, run again).
    """
    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        first, *rest = args
        _, vjp = jax.vjp(fn, tied(first, cotangent), *rest)
        return vjp(cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped
