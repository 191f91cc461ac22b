"""Where a prefix changes scene prompts: through its own K hidden states, which the UNet's cross-attention reads
at the prefix positions, or through the caption words' hidden states, which the text encoder's causal attention
computes with the prefix before them.

Each part in turn comes from an untrained prefix (uniform [0, 1), as training starts) and the other from the
trained one; the scenes are drawn and scored as the evaluation draws and scores them (every scene, N/8
images each, the same noise in every row).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from apl_jax.mini import recognizer, world
from apl_jax.mini.evaluate import EVAL_SAMPLER, scene_images
from apl_jax.mini.metrics import scenes_by_word, score_scenes
from apl_jax.models import FrozenSD
from apl_jax.sampling import Sampler

# row label -> (whose own hidden states, whose reading of the words); None: no prefix at all
ROWS = {
    "without prefix": None,
    "untrained prefix": ("untrained", "untrained"),
    "trained prefix": ("trained", "trained"),
    "trained own states, words read with the untrained": ("trained", "untrained"),
    "untrained own states, words read with the trained": ("untrained", "trained"),
}


@dataclasses.dataclass(frozen=True)
class SplicedPrefix(FrozenSD):
    """The model, but a prefixed prompt's prefix positions take their hidden states from encoding it with `own`,
    and every other position from encoding it with `words`. The prefix a Sampler passes only marks the positions."""
    own: Any = None
    words: Any = None

    @classmethod
    def around(cls, model: FrozenSD, own, words) -> "SplicedPrefix":
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)}, own=own, words=words)

    def encode_text(self, text_params, ids: jax.Array, extra_embeddings: jax.Array | None = None) -> jax.Array:
        if extra_embeddings is None:  # the unconditional prompt
            return super().encode_text(text_params, ids)
        own = super().encode_text(text_params, ids, self.own)
        words = super().encode_text(text_params, ids, self.words)
        return jnp.where((ids >= self.vocab_size)[..., None], own, words)


def splice(model: FrozenSD, trained, placeholder: str, num_images: int, seed: int) -> dict:
    """{row label: {"accuracy": scene accuracy, "by_word": {word: accuracy}}} for every row of ROWS, drawn as the
    evaluation draws its scene images (EVAL_SAMPLER)."""
    from apl_jax.prefix import init_prefix

    trained = jnp.asarray(trained, jnp.float32)
    vectors = {"trained": trained, "untrained": init_prefix(model, trained.shape[0], jax.random.key(0))}
    scenes = scene_images(num_images)
    prompts = [s.caption() for s in scenes]
    params = recognizer.load()
    rows = {}
    for label, parts in ROWS.items():
        spliced = model if parts is None else SplicedPrefix.around(model, vectors[parts[0]], vectors[parts[1]])
        sampler = Sampler(spliced, EVAL_SAMPLER, trained, placeholder)
        pred = recognizer.classify(params, sampler(prompts, seed=seed, with_prefix=parts is not None, progress=True))
        rows[label] = {"accuracy": score_scenes(pred, scenes), "by_word": scenes_by_word(pred, scenes)}
    return rows


def markdown(rows: dict) -> str:
    shapes = [w for w in world.SHAPES if w in next(iter(rows.values()))["by_word"]]
    lines = ["| scenes drawn with | scene accuracy | " + " | ".join(shapes) + " |", "| --- |" + " --- |" * (len(shapes) + 1)]
    lines += [f"| {label} | {r['accuracy']:.3f} | " + " | ".join(f"{r['by_word'][w]:.3f}" for w in shapes) + " |"
              for label, r in rows.items()]
    return "\n".join(lines) + "\n"


def run(model_name: str, prefix_path: str, out: Path, num_images: int, seed: int) -> dict:
    """splice() for a prefix file on a named model; writes out/splice.json and out/splice.md."""
    from apl_jax.export import load_prefix
    from apl_jax.models import load_model

    prefix = load_prefix(prefix_path)
    rows = splice(load_model(model_name), prefix.vectors, prefix.placeholder, num_images, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splice.json").write_text(json.dumps({"model": model_name, "prefix": str(prefix_path), "seed": seed,
                                                 "num_images": num_images, "guidance": EVAL_SAMPLER.guidance_scale,
                                                 "rows": rows}, indent=1))
    (out / "splice.md").write_text(markdown(rows))
    return rows
