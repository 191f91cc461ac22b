"""Multi-head attention through jax.nn.dot_product_attention: cuDNN's fused kernel on GPU where it applies, XLA elsewhere."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from apl_jax.nn.backward import recomputed


def multi_head_attention(query: jax.Array, key: jax.Array, value: jax.Array, heads: int, *,
                         causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over `heads` heads; [B, T, heads x d] in and out."""
    def split(x):
        return x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)

    if cudnn_flash_applies(query.dtype, query.shape[-1] // heads, query.shape[1], key.shape[1]):
        out = jax.nn.dot_product_attention(split(query), split(key), split(value), is_causal=causal,
                                           implementation="cudnn")
    else:
        out = _xla_attention(split(query), split(key), split(value), causal)
    return out.reshape(*query.shape[:2], -1)


def _xla_attention(query, key, value, causal: bool):
    # Only q, k, v are kept for the backward pass, not XLA's heads x T x T probabilities (32 MiB a layer
    # at 256 px in f32): it recomputes them, two small matmuls a layer, as a flash kernel does.
    return recomputed(functools.partial(_scaled_first, causal=causal))(query, key, value)


def _scaled_first(query, key, value, causal: bool):
    # 1/sqrt(d) applied to the queries (T x d) rather than to the scores (T x T): XLA's CPU backend
    # would otherwise materialise the constant broadcast to the scores' shape (32 MiB a layer at 256 px).
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    return jax.nn.dot_product_attention(query * scale, key, value, scale=1.0, is_causal=causal, implementation="xla")


def cudnn_flash_applies(dtype, head_dim: int, query_len: int, key_len: int, device: jax.Device | None = None) -> bool:
    """Whether cuDNN's flash attention takes these shapes, forward and backward, on `device` (the default one).

    jax's implementation=None still means XLA's unfused softmax(QK^T)V (jax 0.10/0.11), which
    materialises every T x T score, so we name cuDNN where its kernel applies: an NVIDIA GPU, half
    precision, a head size that is a multiple of 8 and at most 128, or 256 from Hopper (compute
    capability 9.0) on, and even sequence lengths (jax 0.11 refuses odd ones in the backward pass).
    SD 1.x's UNet self-attention (heads of 40, 80 and 160) qualifies on an H100/H200 in bf16; its
    cross-attention over the 77 prompt tokens (a small 4096 x 77 score matrix), the VAE's single
    512-wide head and the float32 text encoder go to XLA.
    """
    device = device or jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))  # "9.0" on CUDA; ROCm names chips "gfx…"
    if device.platform != "gpu" or not capability[:1].isdigit() or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    return (head_dim % 8 == 0 and head_dim <= (256 if int(capability.split(".")[0]) >= 9 else 128)
            and query_len % 2 == 0 and key_len % 2 == 0)
