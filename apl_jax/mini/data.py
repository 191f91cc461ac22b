"""APL training data for APL-mini, made as the official pipeline makes it.

- identities/: the 16 training names drawn by the base model itself, with the identity-set
  generation command's code (generate_identities), plus each name's partial trait description
  (sex, hair colour, skin) in the manifest (for data.neutral_mode=attributes);
- generic/: captioned renders of scenes and anonymous faces (captions.jsonl).
Both then go through the tfds builders like any user's folders. A finished folder is
kept (keyed by model, sizes and seed), and an interrupted one resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from apl_jax.data.prompts import Templates
from apl_jax.generate_identities import DEFAULT_TEMPLATES, generate
from apl_jax.manifest import MANIFEST
from apl_jax.mini import captions, world

IDENTITIES_PER_NAME = 64
GENERIC_IMAGES = 1024
GENERIC_MIX = {"scene": 0.5, "anonymous": 0.5}


def render_generic(out: Path, count: int, seed: int, templates: Templates) -> None:
    """count renders (scenes and anonymous faces) with their captions; skips a finished folder."""
    if (out / "captions.jsonl").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 8])
    samples = world.mixture(rng, GENERIC_MIX)
    lines = []
    for i in tqdm(range(count), desc="generic renders", unit="img", mininterval=2):
        s = next(samples)
        Image.fromarray(s.image).save(out / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"{i:05d}.png", "caption": captions.caption(s, rng, templates)}))
    tmp = out / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "captions.jsonl")  # written last: its presence means the folder is complete


def data_folder(root: Path, model_name: str, seed: int, per_name: int, generic: int) -> Path:
    """Where prepare keeps its data: keyed by the sizes, the seed and the model's weights (the hashes in
    its MANIFEST.json), so that a rebuilt model draws a new identity set."""
    from apl_jax.models import resolve_model

    manifest_file = resolve_model(model_name) / MANIFEST
    weights = manifest_file.read_text() if manifest_file.is_file() else ""
    key = hashlib.sha256(json.dumps([model_name, weights, per_name, generic, seed]).encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"apl-mini-data-{key}"


def prepare(root: Path, model_name: str, seed: int = 0, per_name: int = IDENTITIES_PER_NAME,
            generic: int = GENERIC_IMAGES) -> tuple[Path, Path]:
    """(identity_dir, caption_dir) under data_folder, made on first use with model_name's own samples."""
    from apl_jax.models import load_model
    from apl_jax.sampling import Sampler, SamplerConfig

    folder = data_folder(root, model_name, seed, per_name, generic)
    templates = Templates.load(DEFAULT_TEMPLATES)
    identities, generic_dir = folder / "identities", folder / "generic"
    manifest = identities / "manifest.json"
    attributes = {n: world.cast()[n].partial_description() for n in world.TRAIN_NAMES}
    if not manifest.is_file():
        # At the sampler's CFG 7.0, not the evaluation's metrics.GUIDANCE: every shipped prefix trained on this set.
        sampler = Sampler(load_model(model_name), SamplerConfig(batch_size=64))
        # No negative prompt: the official one is SD vocabulary this model never saw, so it would be noise.
        generate(sampler, list(world.TRAIN_NAMES), per_name, identities, seed, Path(DEFAULT_TEMPLATES),
                 negative_prompt="")
    values = json.loads(manifest.read_text())
    if values.get("attributes") != attributes:  # also mends a folder made with older descriptions
        values["attributes"] = attributes
        manifest.write_text(json.dumps(values, indent=1))
    render_generic(generic_dir, generic, seed, templates)
    return identities, generic_dir


def with_mini_data(config):
    """config training on APL-mini's data (made on first use under data.cache_dir) when it names no folders."""
    data = config.data
    if data.source != "folders" or data.identity_dir or data.caption_dir:
        return config
    identities, generic = prepare(data.cache_dir, config.model.path, config.train.seed)
    print(f"data: APL-mini's identity set {identities} and generic renders {generic}")
    return dataclasses.replace(config, data=dataclasses.replace(data, identity_dir=str(identities),
                                                                caption_dir=str(generic)))
