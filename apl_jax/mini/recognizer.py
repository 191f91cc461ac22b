"""APL-mini's recognizer: a small Flax CNN that plays ArcFace (identity + embedding) and a scene classifier.

From one 32 px image it predicts:
- identity: one of the 24 named people or OTHER, with a unit embedding for a cosine ID score;
- face vs scene;
- the person's traits (hair colour, ...) and the scene's shape and colour.
It trains on renders of both styles with blur, noise, shifts and lighting changes, half
of them passed through the base model's VAE, so it also reads the base model's imperfect
samples (ArcFace, in the paper, has seen millions of imperfect photos).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from apl_jax.manifest import verify
from apl_jax.mini import world
from apl_jax.models import SHIPPED_MODELS

# head -> classes; an image's label is -1 where a head does not apply (a scene has no hair)
HEADS = {
    "identity": world.NAMES + ("other",),
    "face": ("scene", "face"),
    "sex": world.SEXES,
    "skin": tuple(world.SKINS),
    "hair_colour": tuple(world.HAIR_COLOURS),
    "hair_style": world.HAIR_STYLES,
    "glasses": ("no", "yes"),
    "beard": ("no", "yes"),
    "shape": world.SHAPES,
    "colour": tuple(world.COLOURS),
}
EMBEDDING = 64
SHIPPED = SHIPPED_MODELS / "apl-mini-recognizer"  # a folder with recognizer.msgpack and its MANIFEST.json
WEIGHTS_FILE = "recognizer.msgpack"
RECOGNIZER_MIX = {"named": 0.5, "anonymous": 0.25, "scene": 0.25}


def warmup_cosine(peak: float, steps: int, final: float) -> optax.Schedule:
    """Linear warm-up over the first tenth (at most 300 steps), then cosine decay to `final` (every APL-mini stage)."""
    return optax.warmup_cosine_decay_schedule(0, peak, min(300, steps // 10 + 1), max(steps, 2), final)


def labels(sample: world.Sample) -> dict[str, int]:
    out = {head: -1 for head in HEADS}
    out["face"] = int(sample.face is not None)
    if sample.face is not None:
        face = sample.face
        out["identity"] = sample.identity
        for trait in ("sex", "skin", "hair_colour", "hair_style"):
            value = face.visible(trait)
            out[trait] = -1 if value is None else HEADS[trait].index(value)
        out["glasses"], out["beard"] = int(face.glasses), int(face.beard)
    else:
        out["shape"], out["colour"] = world.SHAPES.index(sample.scene.shape), list(world.COLOURS).index(sample.scene.colour)
    return out


class Recognizer(nn.Module):
    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """uint8 [B, 32, 32, 3] -> {"embedding": unit [B, EMBEDDING], head: logits [B, classes]}."""
        x = images.astype(jnp.float32) / 127.5 - 1
        for width, convs in ((16, 1), (32, 2), (64, 2)):  # 32 -> 16 -> 8 -> 4 px
            for _ in range(convs):
                x = nn.relu(nn.GroupNorm(8)(nn.Conv(width, (3, 3))(x)))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        features = nn.Dense(EMBEDDING)(x)
        out = {head: nn.Dense(len(classes), name=head)(nn.relu(features)) for head, classes in HEADS.items()}
        out["embedding"] = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-8)
        return out


def init_params(seed: int = 0):
    return jax.jit(Recognizer().init)(jax.random.PRNGKey(seed), jnp.zeros((1, world.SIZE, world.SIZE, 3), jnp.uint8))["params"]


@jax.jit
def predict(params, images: jax.Array) -> dict[str, jax.Array]:
    return Recognizer().apply({"params": params}, images)


def classify(params, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """{head: predicted class [N], "embedding": [N, EMBEDDING]} for uint8 images."""
    parts = []
    for i in range(0, len(images), batch):
        out = predict(params, jnp.asarray(images[i : i + batch]))
        parts.append({**{h: jnp.argmax(out[h], -1) for h in HEADS}, "embedding": out["embedding"]})
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]} if parts else {}


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Blur, noise, shifts and lighting: what separates a diffusion sample from a clean render."""
    k_blur, k_noise, k_sigma, k_light, k_shift = jax.random.split(key, 5)
    x = images.astype(jnp.float32)
    b = x.shape[0]
    blurred = (x + jnp.roll(x, 1, 1) + jnp.roll(x, -1, 1) + jnp.roll(x, 1, 2) + jnp.roll(x, -1, 2)) / 5
    alpha = jax.random.uniform(k_blur, (b, 1, 1, 1), maxval=1.0)
    x = (1 - alpha) * x + alpha * blurred
    x = x * jax.random.uniform(k_light, (b, 1, 1, 3), minval=0.75, maxval=1.2)
    x = x + jax.random.normal(k_noise, x.shape) * jax.random.uniform(k_sigma, (b, 1, 1, 1), maxval=12.0)
    shifts = jax.random.randint(k_shift, (2,), -2, 3)
    x = jnp.roll(x, (shifts[0], shifts[1]), (1, 2))
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def render_set(size: int, seed: int, shifted_share: float = 0.3) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng([seed, 3, size])
    plain = world.mixture(rng, RECOGNIZER_MIX, world.PLAIN)
    shifted = world.mixture(rng, RECOGNIZER_MIX, world.SHIFTED)
    samples = [next(shifted if rng.random() < shifted_share else plain)
               for _ in tqdm(range(size), desc="render recognizer set", unit="img", mininterval=2)]
    targets = [labels(s) for s in samples]
    return np.stack([s.image for s in samples]), {h: np.asarray([t[h] for t in targets], np.int32) for h in HEADS}


def loss_fn(params, images, targets):
    out = Recognizer().apply({"params": params}, images)
    total = 0.0
    for head in HEADS:
        mask = targets[head] >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(out[head], jnp.maximum(targets[head], 0))
        total = total + jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)
    return total


def train(steps: int, seed: int = 0, batch: int = 64, pool_size: int = 60_000,
          roundtrip: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """roundtrip: a VAE encode-decode; half the renders pass through it, so the recognizer
    knows the decoder's softness as well as clean renders (labels stay those of the render)."""

    images, targets = render_set(min(pool_size, max(steps * batch // 4, 256)), seed)
    if roundtrip is not None:
        half = np.random.default_rng([seed, 9]).random(len(images)) < 0.5
        images[half] = roundtrip(images[half])
    optimizer = optax.adam(warmup_cosine(2e-3, steps, 2e-5))
    params = init_params(seed)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, targets, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, augment(images, key), targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([seed, 4])
    key = jax.random.PRNGKey(seed)
    with tqdm(range(steps), desc="recognizer", unit="step", mininterval=2) as bar:
        for i in bar:
            index = rng.integers(len(images), size=batch)
            params, opt_state, loss = step(params, opt_state, images[index], {h: t[index] for h, t in targets.items()},
                                           jax.random.fold_in(key, i))
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return params


@dataclasses.dataclass(frozen=True)
class Accuracy:
    identity: float  # over faces, 25 classes
    face: float  # face vs scene, over all
    scene: float  # shape and colour both right, over scenes


def accuracy(params, size: int = 2000, seed: int = 12345) -> Accuracy:
    """On fresh renders (seeds the training set never used), no augmentation."""
    images, targets = render_set(size, seed)
    pred = classify(params, images)
    faces, scenes = targets["face"] == 1, targets["face"] == 0
    return Accuracy(
        identity=float(np.mean(pred["identity"][faces] == targets["identity"][faces])),
        face=float(np.mean(pred["face"] == targets["face"])),
        scene=float(np.mean((pred["shape"][scenes] == targets["shape"][scenes])
                            & (pred["colour"][scenes] == targets["colour"][scenes]))),
    )


def save(params, folder: Path) -> None:
    """float16, as the shipped models: half the size, and loading casts back to float32."""
    folder.mkdir(parents=True, exist_ok=True)
    half = jax.tree.map(lambda x: np.asarray(x, np.float16), jax.device_get(params))
    (folder / WEIGHTS_FILE).write_bytes(flax.serialization.to_bytes(half))


def load(folder: Path = SHIPPED):
    verify(folder)
    params = flax.serialization.msgpack_restore((folder / WEIGHTS_FILE).read_bytes())
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
