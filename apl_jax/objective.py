"""The APL loss for one batch (docs/design.md, section 1). Pure; knows nothing about devices.

batch:
  pixels       uint8 [B, H, W, 3]   images (uint8 keeps host->device transfers small), or instead
  posterior_mean, posterior_std [B, h, w, C]   their cached VAE encodings
  private_ids  int32 [B, 77]        "alz ..." prompts, placeholder included
  neutral_ids  int32 [B, 77]        the neutral prompts
keys: one PRNG key per example, so an example's noise does not depend on which
device (or how many) it lands on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apl_jax.models import FrozenSD
from apl_jax.prefix import encode_with_prefix
from apl_jax.schedulers import add_noise


def encode_posterior(model: FrozenSD, vae_params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The VAE posterior (mean, std), channels-last, of uint8 [B, H, W, 3] images."""
    images = pixels.astype(jnp.float32) / 127.5 - 1.0
    return model.posterior(vae_params, jnp.transpose(images, (0, 3, 1, 2)).astype(model.dtype))  # the VAE takes NCHW


def sample_latents(model: FrozenSD, mean: jax.Array, std: jax.Array, noise: jax.Array) -> jax.Array:
    """z0 = posterior sample x scaling factor, NCHW as the UNet wants it."""
    z0 = mean.astype(jnp.float32) + std.astype(jnp.float32) * noise
    return jnp.transpose(z0, (0, 3, 1, 2)) * model.latent_scaling


def frozen_inputs(params: dict, start_prefix=None) -> dict:
    """The arrays apl_loss reads besides the prefix: the model's, all but the VAE's decoder half, which
    training never runs (SD 1.5's is 198 MB in float32), and with a caption drift weight the prefix training
    started from. A new top-level dict: the caller's stops holding the decoder once dropped."""
    frozen = {**params, "vae": {k: v for k, v in params["vae"].items() if k in ("encoder", "quant_conv")}}
    if start_prefix is not None:
        frozen["start_prefix"] = start_prefix
    return frozen


def caption_drift(context, context_start, private_ids, neutral_ids, placeholder_id: int, num_vectors: int) -> jax.Array:
    """[B]: for a generic example ("alz CAPTION" / "CAPTION"), the mean squared change of the caption's hidden
    states behind the prefix (end-of-text and padding included: the UNet reads all 77) from their reading
    behind the prefix training started from; 0 for an identity example, whose private prompt is not its
    neutral one behind the placeholder.

    Why the start and not the plain caption: any prefix, an untrained one too, changes how the words behind
    it are read, and an untrained one changes no picture; what loses scenes is what training adds to that
    reading (docs/design.md, "Caption drift")."""
    length = neutral_ids.shape[1]
    # Compared where both still hold the caption once the prefix has pushed K-1 tokens off the end, so a
    # caption cut short behind the prefix counts as generic too.
    generic = (private_ids[:, 1] == placeholder_id) & jnp.all(
        private_ids[:, 2:length - num_vectors + 1] == neutral_ids[:, 1:length - num_vectors], axis=1)
    drift = (context - context_start)[:, num_vectors + 1:]  # start of text, then the K prefix rows
    return jnp.where(generic, jnp.mean(jnp.square(drift), axis=(1, 2)), 0.0)


def apl_loss(prefix, frozen, batch, keys, *, model: FrozenSD, placeholder_id: int, negative_guidance: float,
             caption_drift_weight: float = 0.0, fused_passes: bool = False):
    """mean((e_p - (e_n - eta * (sg(e_p) - e_n)))^2), plus caption_drift_weight x the batch's mean caption
    drift when `frozen` holds a start_prefix (frozen_inputs); only `prefix` gets gradients.

    `model` supplies the modules only; every array comes in through `frozen`.
    fused_passes: one UNet call on the doubled batch (cheaper forward); False: two
    calls, so the backward pass runs over the private half only.
    """
    if "posterior_mean" in batch:  # images encoded once and cached (they repeat across steps)
        mean, std = batch["posterior_mean"], batch["posterior_std"]
    else:
        mean, std = encode_posterior(model, frozen["vae"], batch["pixels"])
    latent_hw_c = mean.shape[1:]
    num_timesteps = model.scheduler.num_train_timesteps

    def draw(key):
        k_post, k_t, k_eps = jax.random.split(key, 3)
        # Uniform over 0..T-1, as the official DDIM-bin-then-offset draw is overall.
        t = jax.random.randint(k_t, (), 0, num_timesteps)
        return jax.random.normal(k_post, latent_hw_c), t, jax.random.normal(k_eps, latent_hw_c)

    posterior_noise, t, eps = jax.vmap(draw)(keys)
    z0 = sample_latents(model, mean, std, posterior_noise)
    eps = jnp.transpose(eps, (0, 3, 1, 2))
    z_t = add_noise(frozen["scheduler"]["alphas_cumprod"], z0, eps, t)

    context_neutral = jax.lax.stop_gradient(model.encode_text(frozen["text_encoder"], batch["neutral_ids"]))
    context_private = encode_with_prefix(model, frozen["text_encoder"], prefix, batch["private_ids"], placeholder_id)
    z_t = z_t.astype(model.dtype)
    # The official third pass ("eps_private_freeze") equals e_p: stop_gradient(e_p) replaces it.
    if fused_passes:
        both = model.predict_noise(frozen["unet"], jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                                   jnp.concatenate([context_neutral, context_private])).astype(jnp.float32)
        e_neutral, e_private = jnp.split(both, 2)
    else:
        e_neutral = model.predict_noise(frozen["unet"], z_t, t, context_neutral).astype(jnp.float32)
        e_private = model.predict_noise(frozen["unet"], z_t, t, context_private).astype(jnp.float32)
    e_neutral = jax.lax.stop_gradient(e_neutral)
    target = e_neutral - negative_guidance * (jax.lax.stop_gradient(e_private) - e_neutral)
    loss = jnp.mean((e_private - target) ** 2)
    if "start_prefix" in frozen:  # train.caption_drift_weight > 0
        context_start = jax.lax.stop_gradient(encode_with_prefix(
            model, frozen["text_encoder"], frozen["start_prefix"], batch["private_ids"], placeholder_id))
        drift = caption_drift(context_private, context_start, batch["private_ids"], batch["neutral_ids"],
                              placeholder_id, prefix.shape[0])
        loss = loss + caption_drift_weight * jnp.mean(drift)
    return loss
