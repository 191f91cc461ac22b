"""Sharded text-to-image sampling, with or without the prefix.

Text encoding, classifier-free guidance, every scheduler step (lax.fori_loop) and
the VAE decode form one compiled program, jitted over a 1-D device mesh with the
prompts split across devices. Only shapes recompile: prompts, seeds, guidance and
prefix on/off are all traced arguments. Image i's noise comes from
fold_in(PRNGKey(seed), i), so a seed gives the same images on any device count.

Across processes (a TPU pod, jax.distributed) the mesh spans every process's
devices: each process puts only its own shards of the inputs, its devices draw its
slice of every batch, and the images are then gathered so every process holds them
all; `owned` says which ones this process drew, so each writes only its own files.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image, ImageDraw
from tqdm import tqdm

from apl_jax import schedulers, storage
from apl_jax.errors import UserError
from apl_jax.files import atomic_write
from apl_jax.models import FrozenSD
from apl_jax.prefix import check_prefix_width, expand_placeholder, single_token_id
from apl_jax.tokenizer import tokenize

NO_PLACEHOLDER = -1  # matches no token id: the prefix rows exist but are never used


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    scheduler: str = "ddim"  # the official evaluation: DDIM, 20 steps, CFG 7.0, eta 0
    steps: int = 20
    guidance_scale: float = 7.0
    eta: float = 0.0  # DDIM only
    resolution: int | None = None  # pixels; None: the UNet's sample size x the VAE factor
    batch_size: int | None = None  # images per compiled call; None: one per device


class Sampler:
    def __init__(self, model: FrozenSD, config: SamplerConfig = SamplerConfig(), prefix: np.ndarray | None = None,
                 placeholder: str = "alz"):
        # the timesteps and coefficients of every model call; checks the scheduler name and step count
        scheduler_plan = schedulers.plan(model.scheduler, config.scheduler, config.steps)
        self.model, self.config, self.placeholder = model, config, placeholder
        self.resolution = config.resolution or model.unet.config.sample_size * model.vae_scale_factor
        if self.resolution % model.vae_scale_factor:
            raise UserError(f"resolution {self.resolution} is not divisible by the VAE factor {model.vae_scale_factor}")
        devices = jax.devices()
        self.batch_size = config.batch_size or len(devices)
        if self.batch_size % len(devices):
            raise UserError(f"batch size {self.batch_size} does not divide across {len(devices)} devices")
        # Auto axes: let XLA propagate the batch sharding through the whole program.
        self.mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
        self.placeholder_id = single_token_id(model, placeholder) if prefix is not None else NO_PLACEHOLDER
        if prefix is None:  # one zero row keeps a single program for both cases
            prefix = np.zeros((1, model.text_width), np.float32)
        check_prefix_width(model, np.asarray(prefix))

        latent = self.resolution // model.vae_scale_factor
        self.latent_shape = (model.unet.config.in_channels, latent, latent)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.tree.map(
            lambda x: _global(x, replicated),
            {"text_encoder": model.params["text_encoder"], "unet": model.params["unet"], "vae": model.params["vae"],
             "scheduler": scheduler_plan, "prefix": jnp.asarray(prefix, jnp.float32)},
        )
        self._split = NamedSharding(self.mesh, PartitionSpec("batch"))
        self._program = jax.jit(self._generate, out_shardings=self._split)

    def _generate(self, params, ids, uncond_ids, keys, placeholder_id, guidance, eta):
        model, kind = self.model, self.config.scheduler
        expanded = expand_placeholder(ids, placeholder_id, model.vocab_size, params["prefix"].shape[0])
        context = model.encode_text(params["text_encoder"], expanded, extra_embeddings=params["prefix"])
        uncond = model.encode_text(params["text_encoder"], uncond_ids)
        context = jnp.concatenate([uncond, context])
        plan = params["scheduler"]
        # SD 1.x's samplers all start from unit-variance noise (diffusers' init_noise_sigma is 1)
        latents = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape))(keys)

        def body(i, carry):
            latents, history = carry
            t = plan["timesteps"][i]
            doubled = jnp.concatenate([latents, latents])
            timesteps = jnp.broadcast_to(t, (doubled.shape[0],))
            noise = model.predict_noise(params["unet"], doubled.astype(model.dtype), timesteps, context)
            e_uncond, e_cond = jnp.split(noise.astype(jnp.float32), 2)
            guided = e_uncond + guidance * (e_cond - e_uncond)
            # DDIM's eta term; the other samplers ignore it, and XLA drops the unused draw
            step_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), self.latent_shape))(keys)
            return schedulers.step(kind, plan, history, i, guided, latents, eta, step_noise)

        # PNDM calls the model once more than `steps` (diffusers' PLMS schedule), so loop over the plan
        calls = len(plan["timesteps"])
        history = schedulers.init_history(kind, latents.shape)
        latents, _ = jax.lax.fori_loop(0, calls, body, (latents, history))
        decoded = model.decode(params["vae"], (latents / model.latent_scaling).astype(model.dtype))
        images = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0, 1)
        return jnp.round(jnp.transpose(images, (0, 2, 3, 1)) * 255).astype(jnp.uint8)

    def _arguments(self, texts, indices, seed, placeholder_id, negative_prompt):
        """One compiled call's arguments; a short chunk is padded to the batch size."""
        pad = self.batch_size - len(texts)
        texts = list(texts) + [texts[-1]] * pad
        indices = np.concatenate([indices, np.zeros(pad, int)])
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.asarray(indices))
        prefix_extra = self.params["prefix"].shape[0] - 1 if placeholder_id != NO_PLACEHOLDER else 0
        return (
            self.params,
            _global(tokenize(self.model.tokenizer, texts, prefix_extra), self._split),
            _global(tokenize(self.model.tokenizer, [negative_prompt] * self.batch_size), self._split),
            _global(keys, self._split),
            jnp.int32(placeholder_id),
            jnp.float32(self.config.guidance_scale),
            jnp.float32(self.config.eta),
        )

    def flops_per_batch(self) -> float:
        """XLA's FLOP count of one compiled call (batch_size images)."""
        arguments = self._arguments(["a"], np.zeros(1, int), 0, NO_PLACEHOLDER, "")
        cost = self._program.lower(*arguments).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float((cost or {}).get("flops", 0.0))

    def owned(self, count: int) -> np.ndarray:
        """The positions, among `count` images of one call, that this process's devices draw.

        Every image belongs to exactly one process, so a process that writes only these
        writes its slice of the files, and all processes together write each file once."""
        per_device = self.batch_size // self.mesh.size
        mine = [k for k, device in enumerate(self.mesh.devices.flat) if device.process_index == jax.process_index()]
        rows = np.arange(count)
        return rows[np.isin(rows % self.batch_size // per_device, mine)]

    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (shape changes only)."""
        return self._program._cache_size()

    def __call__(self, prompts: Sequence[str], seed: int = 0, with_prefix: bool = False, negative_prompt: str = "",
                 indices: Sequence[int] | None = None, progress: bool = False) -> np.ndarray:
        """uint8 [len(prompts), H, W, 3]; image j's noise is fold_in(PRNGKey(seed), indices[j]) (default j)."""
        if with_prefix and self.placeholder_id == NO_PLACEHOLDER:
            raise UserError("with_prefix needs a sampler built with a prefix")
        texts = [f"{self.placeholder} {p}" if with_prefix else p for p in prompts]
        indices = np.arange(len(texts)) if indices is None else np.asarray(indices)
        placeholder_id = self.placeholder_id if with_prefix else NO_PLACEHOLDER
        out = []
        chunks = range(0, len(texts), self.batch_size)
        for start in tqdm(chunks, desc="sampling", unit="batch", disable=not progress or len(chunks) < 2):
            chunk = texts[start : start + self.batch_size]
            arguments = self._arguments(chunk, indices[start : start + len(chunk)], seed, placeholder_id, negative_prompt)
            out.append(_gather(self._program(*arguments))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)


def _global(value, sharding: NamedSharding) -> jax.Array:
    """A value that every process holds in full, as a global array: each process places its own shards only."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _gather(images: jax.Array) -> np.ndarray:
    """A batch split over the devices of every process, whole on this host."""
    if jax.process_count() == 1:
        return np.asarray(images)
    return np.asarray(multihost_utils.process_allgather(images, tiled=True))


def image_grid(rows: Sequence[np.ndarray], row_labels: Sequence[str] = (), column_labels: Sequence[str] = (),
               scale: int = 1) -> Image.Image:
    """Rows of equally sized uint8 images as one labelled PIL image."""
    rows = [np.asarray(r) for r in rows]
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 12 + int(max((measure.textlength(s) for s in row_labels), default=0)) if row_labels else 0
    top = 16 if column_labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (left + cols * w, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((left + c * w + 2, 2), label, fill="black")
    for r, images in enumerate(rows):
        if r < len(row_labels):
            draw.text((4, top + r * h + h // 2 - 6), row_labels[r], fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image).resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + c * w, top + r * h))
    return grid


def save_images(folder, images: np.ndarray, prompts: Sequence[str], tag: str,
                positions: Sequence[int] | None = None) -> list:
    """One PNG per image: NNNN-<prompt slug>-<tag>.png, in a local or gs:// folder.

    Only `positions` are written (default: all); in a multi-process run each process
    passes Sampler.owned, so each file is written once. Returns every image's path."""
    folder = storage.path(folder)
    paths = []
    for i, prompt in enumerate(prompts):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:60]
        paths.append(folder / f"{i:04d}-{slug}-{tag}.png")
    for i in range(len(paths)) if positions is None else positions:
        atomic_write(paths[i], lambda tmp: Image.fromarray(images[i]).save(tmp, format="PNG"))
    return paths


def prompt_grid(sampler: Sampler, prompts: Sequence[str], num_images: int, seed: int, variants: Sequence[bool],
                negative_prompt: str = "", save_dir=None, scale: int | None = None):
    """Each prompt x each variant (with_prefix False/True) as a row of num_images, on the same seeds.

    Returns (grid image, row labels); a prompt's rows are adjacent, plain above prefixed.
    """
    expanded = [p for p in prompts for _ in range(num_images)]
    rows = {}
    for with_prefix in variants:
        images = sampler(expanded, seed=seed, with_prefix=with_prefix, negative_prompt=negative_prompt, progress=True)
        if save_dir is not None:
            save_images(save_dir, images, expanded, "prefix" if with_prefix else "plain", sampler.owned(len(expanded)))
        for i, prompt in enumerate(prompts):
            label = f"[{sampler.placeholder}] {prompt}" if with_prefix else prompt
            rows[(i, with_prefix)] = (label, images[i * num_images : (i + 1) * num_images])
    ordered = [rows[key] for key in sorted(rows)]
    labels = [label for label, _ in ordered]
    grid = image_grid([images for _, images in ordered], labels, [f"seed {seed} #{k}" for k in range(num_images)],
                      scale=scale or max(1, 128 // sampler.resolution))
    return grid, labels
