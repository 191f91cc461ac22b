"""What APL-mini's renders are called: the captions the base model learns and the prompts evaluation uses."""

from __future__ import annotations

import numpy as np

from apl_jax.data.prompts import Templates
from apl_jax.generate_identities import identity_prompt
from apl_jax.mini import world

PORTRAIT_PROMPT = "A close-up portrait of {name}"
# Words that mean nothing in this world, put before captions in the build's "shift" stage
FILLER = ("image", "picture", "nice", "simple", "the", "with", "this", "is", "showing", "here", "some", "very",
          "new", "old", "good", "small", "big", "one", "two", "view", "scene", "art", "drawing", "style")


def named_caption(name: str, k: int, seed: int, templates: Templates) -> str:
    """The prompt the official identity-set generation would use for image k of NAME (a cast or DreamBooth name)."""
    index = world.NAMES.index(name) if name in world.NAMES else len(world.NAMES) + world.DREAMBOOTH_NAMES.index(name)
    return identity_prompt(name, index, k, seed, templates.pre_templates, templates.templates)


def attribute_caption(face: world.Face, rng: np.random.Generator, templates: Templates) -> str:
    """'[PRE] FIRST [TEMPLATE][, REST]': the shape of an attributes-mode neutral prompt (data/prompts.py)."""
    first, _, rest = face.description(rng).partition(", ")
    pre = templates.pre_templates[rng.integers(len(templates.pre_templates))]
    template = f" {templates.templates[rng.integers(len(templates.templates))]}" if rng.random() < 0.5 else ""
    return f"{pre}{first}{template}" + (f", {rest}" if rest else "")


def caption(sample: world.Sample, rng: np.random.Generator, templates: Templates) -> str:
    if sample.scene is not None:
        return sample.scene.caption()
    if sample.identity == world.OTHER:
        return attribute_caption(sample.face, rng, templates)
    return named_caption(world.NAMES[sample.identity], int(rng.integers(1 << 30)), 0, templates)


def with_filler(text: str, rng: np.random.Generator, max_words: int = 12) -> str:
    """Half the time, 1..max_words FILLER words before the caption: the same meaning at other token
    positions, so the text encoder does not tie meaning to absolute positions (an APL prefix moves
    every prompt token K-1 places to the right)."""
    if rng.random() < 0.5:
        return text
    words = rng.choice(FILLER, size=rng.integers(1, max_words + 1))
    return " ".join([*words, text])
