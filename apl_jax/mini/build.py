"""Train APL-mini's models from scratch: VAE, then CLIP text encoder + UNet (half the captions behind
filler words from the first step, so meaning does not hang on absolute token positions), then
apl-mini-ft, apl-mini-db (DreamBooth-style: the base UNet fine-tuned few-shot on two names it never
saw) and the recognizer.

Every stage is seeded and writes its result under the work folder before the next
starts; a rerun skips finished stages and resumes the diffusion stages from their
last orbax checkpoint, so an interrupted build loses at most `checkpoint_every` steps.

The build is deterministic for a given jax version and XLA CPU configuration (8 simulated host
devices, say, sum in another order than 1). BUILD.json beside the models records the config, that
environment, each stage's minutes and the world's fingerprint: a hash of small draws of every training
set, which the tests compare with this code's, so weights that the committed code did not make are caught.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from apl_jax import objective
from apl_jax.data.prompts import Templates
from apl_jax.manifest import MANIFEST, write_manifest
from apl_jax.mini import captions, recognizer, world
from apl_jax.mini.recognizer import warmup_cosine
from apl_jax.models import SHIPPED_MODELS, TOKEN_TABLE, FrozenSD, random_model, token_table
from apl_jax.schedulers import add_noise
from apl_jax.tokenizer import tokenize

log = logging.getLogger(__name__)

# SD-1.x-shaped, small: CLIP width 64 with the real tokenizer, UNet (32, 64), a 3-block VAE
# (32 px images -> 8x8x4 latents). Sized so the build fits an hour on two CPU cores and
# the float16 weights stay under 15 MB (the 49408-row token table is most of them).
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
            cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2)
VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=world.SIZE)
# Shares of the base model's training images; the empty caption is its CFG "unconditional". Scenes have
# 120 captions to the faces' 24 names and an open set of anonymous faces, hence a larger share than
# their 0.25 of before (scene accuracy 0.60; 0.99 at 0.35). Anonymous faces went from 0.25 to 0.3 when
# half of them came to be captioned "a person" (captions.PERSON_SHARE), so that descriptions keep theirs.
BASE_MIX = {"named": 0.4, "anonymous": 0.3, "scene": 0.3}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    pool_size: int = 40_000  # renders the base model trains on (each with CAPTIONS_PER_IMAGE captions)
    vae_steps: int = 2_500
    vae_batch: int = 32
    # 9,000 drew the 24 names in 0.935 of their images (target 0.95), 10,000 in 0.977 but took the build to 61.7 min
    sd_steps: int = 9_500
    sd_batch: int = 32
    sd_learning_rate: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    ft_pool_size: int = 4_000
    ft_steps: int = 400
    ft_learning_rate: float = 2e-4
    db_renders_per_name: int = 8  # DreamBooth's few shots
    db_prior_images: int = 512  # prior preservation: a fresh draw of the base mix, half of every batch
    db_steps: int = 1_500  # 400 steps at 3e-4, or 600 at 1e-3, left the two people half drawn
    # The names' token rows (dreambooth_token_ids) carry who they are: rows at 1e-2 and the UNet at 3e-4
    # drew them in 0.81 of their images (validation draw), against 0.56 with both at 1e-3, and kept more of the cast
    db_learning_rate: float = 3e-4
    db_token_learning_rate: float = 1e-2
    db_ema_decay: float = 0.99  # the base's 0.999 kept two thirds of the starting UNet after 400 steps
    recognizer_steps: int = 2_500
    checkpoint_every: int = 500

    @classmethod
    def toy(cls) -> "BuildConfig":
        """A few steps of everything: for tests of the machinery, not of the results."""
        return cls(pool_size=96, vae_steps=3, vae_batch=8, sd_steps=4, sd_batch=8, ft_pool_size=32,
                   ft_steps=2, db_renders_per_name=2, db_prior_images=8, db_steps=2, recognizer_steps=3,
                   checkpoint_every=2)


CAPTIONS_PER_IMAGE = 4


@dataclasses.dataclass
class Pool:
    images: np.ndarray  # uint8 [N, SIZE, SIZE, 3]
    caption_ids: np.ndarray  # int32 [N, CAPTIONS_PER_IMAGE, 77]


def render_pool(size: int, seed: int, style: world.Style, tokenizer, templates: Templates, what: str,
                cache: Path | None = None) -> Pool:
    """`size` captioned renders of the BASE_MIX, seeded, half the captions behind filler words
    (captions.with_filler); kept in `cache` (an .npz) when given."""
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            return Pool(saved["images"], saved["caption_ids"])
    rng = np.random.default_rng([seed, size])
    samples = world.mixture(rng, BASE_MIX, style)
    images, texts = [], []
    for _ in tqdm(range(size), desc=f"render {what}", unit="img", mininterval=2):
        s = next(samples)
        images.append(s.image)
        for _ in range(CAPTIONS_PER_IMAGE):
            text = captions.caption(s, rng, templates)
            texts.append(captions.with_filler(text, rng))
    pool = Pool(np.stack(images), caption_ids(tokenizer, texts, size))
    if cache is not None:
        with open(cache.with_suffix(".tmp"), "wb") as f:
            np.savez(f, images=pool.images, caption_ids=pool.caption_ids)
        cache.with_suffix(".tmp").replace(cache)
    return pool


def caption_ids(tokenizer, texts: list[str], size: int) -> np.ndarray:
    """int32 [size, CAPTIONS_PER_IMAGE, 77] of texts in image order."""
    unique, where = np.unique(texts, return_inverse=True)  # the slow tokenizer sees each text once
    return tokenize(tokenizer, list(unique))[where].reshape(size, CAPTIONS_PER_IMAGE, -1)


def dreambooth_pool(config: BuildConfig, tokenizer, templates: Templates) -> Pool:
    """DreamBooth's few shots and prior preservation, half each: db_renders_per_name renders of each
    DreamBooth name under identity-set prompts (repeated), and a fresh draw of the base mix, so that
    the fine-tune keeps what the base knew."""
    rng = np.random.default_rng([config.seed, 9])
    images, texts = [], []
    for i, (name, face) in enumerate(world.dreambooth_cast().items()):
        for k in range(config.db_renders_per_name):
            images.append(world.render_face(face, [config.seed, 9, i, k]))
            texts += [captions.named_caption(name, int(rng.integers(1 << 30)), 0, templates)
                      for _ in range(CAPTIONS_PER_IMAGE)]
    shots = Pool(np.stack(images), caption_ids(tokenizer, texts, len(images)))
    prior = render_pool(config.db_prior_images, config.seed + 3, world.PLAIN, tokenizer, templates, "prior pool")
    repeats = -(-len(prior.images) // len(shots.images))
    return Pool(np.concatenate([np.repeat(shots.images, repeats, 0), prior.images]),
                np.concatenate([np.repeat(shots.caption_ids, repeats, 0), prior.caption_ids]))


def dreambooth_token_ids(tokenizer) -> np.ndarray:
    """The DreamBooth names' tokens that no base caption holds. Real CLIP trained every row of its token table;
    ours trained only the base world's tokens, so these rows are still random, and the two names reached the
    UNet as near-identical contexts (an 0.93 cosine, against 0.34-0.67 from each cast name to its nearest).
    DreamBooth trains these rows with the UNet: the text encoder is the base's but for them."""
    names = {i for name in world.DREAMBOOTH_NAMES for i in tokenizer.encode(name)}
    return np.asarray(sorted(names - captions.base_caption_tokens(tokenizer)), np.int32)


def initial_model() -> FrozenSD:
    return random_model(TEXT, UNET, VAE, "float32")


# ---------------------------------------------------------------- VAE

def train_vae(model: FrozenSD, images: np.ndarray, config: BuildConfig) -> FrozenSD:
    """Reconstruction (L1 + L2) with a light KL; then the latent scaling that gives latents unit variance."""
    optimizer = optax.adam(warmup_cosine(2e-3, config.vae_steps, 1e-4))

    def loss_fn(params, pixels, key):
        x = jnp.transpose(pixels.astype(jnp.float32) / 127.5 - 1, (0, 3, 1, 2))
        mean, std = model.posterior(params, x)
        z = mean + std * jax.random.normal(key, mean.shape)
        error = model.decode(params, jnp.transpose(z, (0, 3, 1, 2))) - x
        kl = 0.5 * jnp.sum(mean**2 + std**2 - 1.0 - 2 * jnp.log(std), axis=(1, 2, 3))  # to N(0, 1), per image
        return jnp.mean(jnp.abs(error)) + jnp.mean(error**2) + 1e-6 * jnp.mean(kl)

    @jax.jit
    def step(params, opt_state, pixels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params["vae"]
    opt_state = optimizer.init(params)
    rng = np.random.default_rng([config.seed, 1])
    key = jax.random.PRNGKey(config.seed)
    with tqdm(range(config.vae_steps), desc="VAE", unit="step", mininterval=2) as bar:
        for i in bar:
            batch = images[rng.integers(len(images), size=config.vae_batch)]
            params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, i))
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    model = dataclasses.replace(model, params={**model.params, "vae": params})
    mean, _ = encode_pool(model, images[:2048])
    scaling = float(1.0 / np.std(mean))
    log.info("VAE: final loss %.4f, latent scaling factor %.4f", float(loss), scaling)
    vae = model.vae.clone(config=dataclasses.replace(model.vae.config, scaling_factor=scaling))
    return dataclasses.replace(model, vae=vae)


def vae_roundtrip(model: FrozenSD, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 images -> their VAE reconstruction (posterior mean, decoded), uint8."""

    @jax.jit
    def roundtrip(params, pixels):
        mean, _ = objective.encode_posterior(model, params, pixels)
        decoded = model.decode(params, jnp.transpose(mean, (0, 3, 1, 2)))
        return jnp.round(jnp.clip((jnp.transpose(decoded, (0, 2, 3, 1)) + 1) * 127.5, 0, 255)).astype(jnp.uint8)

    parts = [np.asarray(roundtrip(model.params["vae"], images[i : i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else images


def encode_pool(model: FrozenSD, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    encode = jax.jit(lambda p, x: objective.encode_posterior(model, p, x))
    parts = [jax.device_get(encode(model.params["vae"], images[i : i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


# ---------------------------------------------------------------- diffusion

def with_token_rows(params: dict, token_ids: np.ndarray, rows) -> dict:
    """params with the text encoder's token-embedding rows `token_ids` set to `rows` [len(token_ids), D]."""
    text = flax.traverse_util.flatten_dict(params["text_encoder"])
    text[TOKEN_TABLE] = jnp.asarray(text[TOKEN_TABLE]).at[token_ids].set(rows.astype(text[TOKEN_TABLE].dtype))
    return {**params, "text_encoder": flax.traverse_util.unflatten_dict(text)}


def merged(frozen: dict, train_params: dict, token_ids: np.ndarray | None) -> dict:
    """The whole model's params from the frozen part and the trained one (whose "token_rows", if any, are rows `token_ids`)."""
    params = {**frozen, **{k: v for k, v in train_params.items() if k != "token_rows"}}
    return params if token_ids is None else with_token_rows(params, token_ids, train_params["token_rows"])


def diffusion_loss_fn(model: FrozenSD, token_ids: np.ndarray | None = None) -> Callable:
    """The SD training loss (epsilon prediction); gradients flow to whatever `train_params` holds."""

    def loss_fn(train_params, frozen, mean, std, ids, key):
        params = merged(frozen, train_params, token_ids)
        k_post, k_t, k_eps = jax.random.split(key, 3)
        z0 = objective.sample_latents(model, mean, std, jax.random.normal(k_post, mean.shape))
        t = jax.random.randint(k_t, (z0.shape[0],), 0, model.scheduler.num_train_timesteps)
        eps = jax.random.normal(k_eps, z0.shape)
        z_t = add_noise(params["scheduler"]["alphas_cumprod"], z0, eps, t)
        context = model.encode_text(params["text_encoder"], ids)
        return jnp.mean((model.predict_noise(params["unet"], z_t, t, context) - eps) ** 2)

    return loss_fn


def train_diffusion(model: FrozenSD, pool: Pool, config: BuildConfig, *, trainable: tuple[str, ...], steps: int,
                    learning_rate: float, checkpoints: Path, what: str, empty_ids: np.ndarray,
                    ema_decay: float | None = None, token_ids: np.ndarray | None = None,
                    token_learning_rate: float | None = None) -> FrozenSD:
    """Train `trainable` params, and the text encoder's token-embedding rows `token_ids` if given (at
    token_learning_rate, default learning_rate), on the pool; returns the model with their EMA (ema_decay,
    default config.ema_decay). Resumes from `checkpoints`."""
    ema_decay = config.ema_decay if ema_decay is None else ema_decay
    token_learning_rate = learning_rate if token_learning_rate is None else token_learning_rate
    mean, std = encode_pool(model, pool.images)
    loss_fn = diffusion_loss_fn(model, token_ids)

    def adam(peak: float) -> optax.GradientTransformation:
        return optax.adam(warmup_cosine(peak, steps, peak / 10))

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"net": adam(learning_rate), "rows": adam(token_learning_rate)},
        lambda params: {k: "rows" if k == "token_rows" else "net" for k in params}))
    frozen = {k: v for k, v in model.params.items() if k not in trainable}
    train_params = {k: model.params[k] for k in trainable}
    if token_ids is not None:
        train_params["token_rows"] = token_table(model.params["text_encoder"])[token_ids]
    state = {"params": train_params, "ema": train_params, "opt": optimizer.init(train_params),
             "step": jnp.zeros((), jnp.int32)}

    @jax.jit
    def step_fn(state, frozen, mean, std, ids, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, mean, std, ids, key)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optax.incremental_update(params, state["ema"], 1 - ema_decay)
        return {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}, loss

    manager = ocp.CheckpointManager(checkpoints.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=1))
    start = manager.latest_step() or 0
    if start:
        state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                                   state)))
        log.info("%s: resumed at step %d", what, start)
    key = jax.random.PRNGKey(config.seed)
    batch = config.sd_batch
    compile_start = time.perf_counter()
    with tqdm(range(start, steps), desc=what, unit="step", initial=start, total=steps, mininterval=2) as bar:
        for i in bar:
            # Batch i is a pure function of (seed, i): a resumed build sees the same batches.
            rng = np.random.default_rng([config.seed, 2, i])
            index = rng.integers(len(pool.images), size=batch)
            ids = pool.caption_ids[index, rng.integers(CAPTIONS_PER_IMAGE, size=batch)]
            ids = np.where(rng.random((batch, 1)) < config.caption_dropout, empty_ids, ids)
            state, loss = step_fn(state, frozen, mean[index], std[index], ids, jax.random.fold_in(key, i))
            if i == start:
                log.info("%s: step compiled in %.1f s", what, time.perf_counter() - compile_start)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if (i + 1) % config.checkpoint_every == 0 or i + 1 == steps:
                manager.save(i + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    return dataclasses.replace(model, params=merged(frozen, state["ema"], token_ids))


# ---------------------------------------------------------------- the whole build

BUILD_RECORD = "BUILD.json"


def stage_fingerprints(config: BuildConfig) -> dict[str, str]:
    """Stage -> sha256 of a 64-image draw of the set it trains on (the VAE and the base: the base pool; the
    fine-tune: the shifted pool; DreamBooth: its shots and prior; the recognizer: its render set), rendered
    and captioned by this code: it changes with the world, the captions, the filler words or the seeds. Kept
    per stage so that a change to one stage's set (the DreamBooth cast, say) leaves the others' records
    standing. The draws are made apart from the build's own (cheap enough for a test)."""
    from apl_jax.generate_identities import DEFAULT_TEMPLATES
    from apl_jax.tokenizer import load_tokenizer

    tokenizer, templates = load_tokenizer(), Templates.load(DEFAULT_TEMPLATES)
    probe = dataclasses.replace(config, db_renders_per_name=2, db_prior_images=8)

    def digest(*arrays: np.ndarray) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(a.tobytes())
        return h.hexdigest()

    def pool_digest(pool: Pool) -> str:
        return digest(pool.images, pool.caption_ids.astype(np.int32))

    base = pool_digest(render_pool(64, config.seed, world.PLAIN, tokenizer, templates, "fingerprint"))
    images, targets = recognizer.render_set(64, config.seed)
    return {"vae": base, "base": base,
            "ft": pool_digest(render_pool(64, config.seed + 1, world.SHIFTED, tokenizer, templates, "fingerprint")),
            "db": pool_digest(dreambooth_pool(probe, tokenizer, templates)),
            "recognizer": digest(images, *(targets[head] for head in sorted(targets)))}


def world_fingerprint(stages: dict[str, str]) -> str:
    """One sha256 over every stage's fingerprint: the whole world the shipped weights were built from."""
    return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest()


def write_build_record(out: Path, config: BuildConfig, stages: dict[str, str], stage_minutes: dict[str, float]) -> None:
    """out/BUILD.json. A build that runs only some stages into a folder keeps the other stages' minutes where
    their sets are unchanged (stage_fingerprints) and so is the config but for the fields of the stages it
    reruns (those named after them: db_*, ft_*, ...); otherwise the record starts anew."""
    path = Path(out) / BUILD_RECORD
    old = json.loads(path.read_text()) if path.is_file() else {}
    rerun = tuple(f"{stage}_" for stage in stage_minutes)

    def kept(fields: dict) -> dict:  # the config the stages not rerun were built with
        return {k: v for k, v in fields.items() if not k.startswith(rerun)}

    old_stages = old.get("stage_fingerprints", {})
    same = (kept(old.get("config", {})) == kept(dataclasses.asdict(config))
            and all(old_stages.get(stage) == stages[stage] for stage in old.get("stage_minutes", {})
                    if stage not in stage_minutes))
    record = {
        "world_fingerprint": world_fingerprint(stages),
        "stage_fingerprints": stages,
        "config": dataclasses.asdict(config),
        "stage_minutes": {**(old.get("stage_minutes", {}) if same else {}), **stage_minutes},
        "environment": build_environment(),
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def build_environment() -> dict:
    """What bitwise reproduction needs besides the code and the config (the module docstring)."""
    return {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"), "numpy": np.__version__,
            "devices": jax.device_count(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def _warn_if_not_the_shipped_environment() -> None:
    shipped = SHIPPED_MODELS / BUILD_RECORD
    if not shipped.is_file():
        return
    recorded = json.loads(shipped.read_text())["environment"]
    if differ := {k: v for k, v in build_environment().items() if recorded.get(k) != v}:
        log.warning("this build runs with %s where the shipped weights were built with %s: its floats, and so "
                    "its weights, will differ from theirs", differ, {k: recorded.get(k) for k in differ})


STAGES = ("vae", "base", "ft", "db", "recognizer")
# The build's outputs, as folders under SHIPPED_MODELS (or --out)
BASE, FINE_TUNED, DREAMBOOTH, RECOGNIZER = "apl-mini", "apl-mini-ft", "apl-mini-db", "apl-mini-recognizer"
SHARED_WITH_BASE = ("model_index.json", "tokenizer", "text_encoder", "vae", "scheduler")  # all but the UNet, unless trained


def save_fine_tuned(model: FrozenSD, base_dir: Path, ft_dir: Path, own: tuple[str, ...] = ()) -> None:
    """A full diffusers folder whose parts other than the UNet and `own` link to the base's (no second copy)."""
    from apl_jax.models import save_model

    if ft_dir.exists():  # an unfinished stage's folder (no MANIFEST): saving through its links would write into the base
        shutil.rmtree(ft_dir)
    save_model(model, ft_dir, dtype="float16")
    for name in (n for n in SHARED_WITH_BASE if n not in own):
        path = ft_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.symlink_to(Path("..") / base_dir.name / name)


@contextlib.contextmanager
def _stage(name: str, minutes: dict[str, float]):
    """Log how long a build stage took, and keep it in `minutes`."""
    started = time.perf_counter()
    yield
    minutes[name] = round((time.perf_counter() - started) / 60, 1)
    log.info("stage %s took %.1f min", name, minutes[name])


def build(out: Path, work: Path, config: BuildConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Write out/apl-mini, out/apl-mini-ft, out/apl-mini-db (diffusers folders) and out/apl-mini-recognizer,
    each with a MANIFEST.json, and out/BUILD.json."""
    from apl_jax.generate_identities import DEFAULT_TEMPLATES
    from apl_jax.models import load_model, save_model
    from apl_jax.tokenizer import load_tokenizer

    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, templates = load_tokenizer(), Templates.load(DEFAULT_TEMPLATES)
    empty_ids = tokenize(tokenizer, [""])
    started = time.perf_counter()
    minutes: dict[str, float] = {}
    _warn_if_not_the_shipped_environment()

    base_pool = work / "base-pool.npz"
    after_vae = work / "after-vae"
    if "vae" in stages and not (after_vae / "model_index.json").is_file():
        with _stage("vae", minutes):
            pool = render_pool(config.pool_size, config.seed, world.PLAIN, tokenizer, templates, "base pool", base_pool)
            save_model(train_vae(initial_model(), pool.images, config), after_vae)
    base_dir = out / BASE
    if "base" in stages and not (base_dir / MANIFEST).is_file():
        with _stage("base", minutes):
            pool = render_pool(config.pool_size, config.seed, world.PLAIN, tokenizer, templates, "base pool", base_pool)
            model = train_diffusion(load_model(after_vae), pool, config, trainable=("text_encoder", "unet"),
                                    steps=config.sd_steps, learning_rate=config.sd_learning_rate,
                                    checkpoints=work / "base-checkpoints", what="text encoder + UNet",
                                    empty_ids=empty_ids)
            save_model(model, base_dir, dtype="float16")
            write_manifest(base_dir)  # last: its presence means the stage is complete
    ft_dir = out / FINE_TUNED
    if "ft" in stages and not (ft_dir / MANIFEST).is_file():
        with _stage("ft", minutes):
            pool = render_pool(config.ft_pool_size, config.seed + 1, world.SHIFTED, tokenizer, templates, "shifted pool")
            model = train_diffusion(load_model(base_dir), pool, config, trainable=("unet",), steps=config.ft_steps,
                                    learning_rate=config.ft_learning_rate, checkpoints=work / "ft-checkpoints",
                                    what="fine-tune UNet (shifted style)", empty_ids=empty_ids)
            save_fine_tuned(model, base_dir, ft_dir)
            write_manifest(ft_dir)
    db_dir = out / DREAMBOOTH
    if "db" in stages and not (db_dir / MANIFEST).is_file():
        with _stage("db", minutes):
            model = train_diffusion(load_model(base_dir), dreambooth_pool(config, tokenizer, templates), config,
                                    trainable=("unet",), steps=config.db_steps, learning_rate=config.db_learning_rate,
                                    checkpoints=work / "db-checkpoints", what="DreamBooth UNet (2 new names)",
                                    empty_ids=empty_ids, ema_decay=config.db_ema_decay,
                                    token_ids=dreambooth_token_ids(tokenizer),
                                    token_learning_rate=config.db_token_learning_rate)
            save_fine_tuned(model, base_dir, db_dir, own=("text_encoder",))
            write_manifest(db_dir)
    recognizer_dir = out / RECOGNIZER
    if "recognizer" in stages and not (recognizer_dir / MANIFEST).is_file():
        with _stage("recognizer", minutes):
            vae_model = load_model(after_vae)
            params = recognizer.train(config.recognizer_steps, config.seed,
                                      roundtrip=lambda images: vae_roundtrip(vae_model, images))
            recognizer.save(params, recognizer_dir)
            write_manifest(recognizer_dir)
    if minutes:
        write_build_record(out, config, stage_fingerprints(config), minutes)
    log.info("build finished in %.1f min", (time.perf_counter() - started) / 60)
