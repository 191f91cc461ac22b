"""What APL-mini's renders are called: the captions the base model learns and the prompts evaluation uses."""

from __future__ import annotations

import functools
import re

import numpy as np

from apl_jax.data.prompts import Templates
from apl_jax.generate_identities import DEFAULT_TEMPLATES, identity_prompt
from apl_jax.mini import world

PORTRAIT_PROMPT = "A close-up portrait of {name}"
COMMON_WORDS = 10_000  # whole-word tokens among the first this many of the CLIP vocabulary count as common
WORLD_WORDS = ("a", "an", "on", "with", "in", "of", "and", "hair", "skin", "face", "eyes", "wearing", "glasses", "beard",
               "bald", "bun", "background", "person")
# What the world calls someone it neither names nor describes. Half the anonymous faces are captioned with it,
# as "a person" in the real world means the faces of everyone, not a celebrity's: APL's neutral prompt
# ("A close-up portrait of a person") then draws an anonymous face. Without it "person" was a filler word, the
# base drew "a person" from the faces it had seen, and 0.38 of those were the cast's.
PERSON = "a person"
PERSON_SHARE = 0.5


def _world_text(names) -> str:
    """Every word the world's captions and prompts are made of, with `names`."""
    templates = Templates.load(DEFAULT_TEMPLATES)
    return " ".join([*templates.pre_templates, *templates.templates, PORTRAIT_PROMPT, *names, *WORLD_WORDS, *world.SEXES,
                     *world.FACE_SHAPES, *world.SKINS, *world.HAIR_COLOURS, *world.HAIR_STYLES, *world.EYE_COLOURS,
                     *world.SHAPES, *world.COLOURS])


@functools.cache
def filler_words() -> tuple[str, ...]:
    """Common words of the CLIP vocabulary that mean nothing in this world (no word of any caption,
    template or name): the build puts them before captions, as real captions begin with all sorts of words."""
    from apl_jax.tokenizer import load_tokenizer

    taken = set(re.findall(r"[a-z]+", _world_text((*world.NAMES, *world.DREAMBOOTH_NAMES)).lower()))
    words = (token[:-4] for token, index in sorted(load_tokenizer().encoder.items(), key=lambda item: item[1])
             if token.endswith("</w>") and index < COMMON_WORDS)
    return tuple(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w not in taken)


def base_caption_tokens(tokenizer) -> set[int]:
    """Every token id a caption of the base model's training set can hold: the world's words, the cast's names
    and the filler words. Any other row of the text encoder's token table keeps its random initialisation."""
    return set(tokenizer.encode(_world_text(world.NAMES))) | set(tokenizer.encode(" ".join(filler_words())))


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


def person_caption(rng: np.random.Generator, templates: Templates) -> str:
    """'[PRE] a person [TEMPLATE]': an anonymous face captioned as the identity set captions a name."""
    return identity_prompt(PERSON, len(world.NAMES) + len(world.DREAMBOOTH_NAMES), int(rng.integers(1 << 30)), 0,
                           templates.pre_templates, templates.templates)


def caption(sample: world.Sample, rng: np.random.Generator, templates: Templates) -> str:
    if sample.scene is not None:
        return sample.scene.caption()
    if sample.identity == world.OTHER:
        if rng.random() < PERSON_SHARE:
            return person_caption(rng, templates)
        return attribute_caption(sample.face, rng, templates)
    return named_caption(world.NAMES[sample.identity], int(rng.integers(1 << 30)), 0, templates)


def with_filler(text: str, rng: np.random.Generator, max_words: int = 12, share: float = 0.5) -> str:
    """In `share` of the calls, 1..max_words filler_words before the caption: the same meaning at other
    token positions, so the text encoder does not tie meaning to absolute positions (an APL prefix moves
    every prompt token K-1 places to the right)."""
    if rng.random() >= share:
        return text
    words = filler_words()
    return " ".join([*(words[i] for i in rng.integers(len(words), size=rng.integers(1, max_words + 1))), text])
