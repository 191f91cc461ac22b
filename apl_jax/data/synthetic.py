"""SYNTHETIC stand-in data: generated in memory, no files, not real faces.

It exists so the training loop runs end to end before the real tfds pipeline
(identity faces, caption pairs) is wired in. Identity images are simple
face-like drawings, one colour scheme per invented name; generic images are a
coloured square on a coloured background with a matching caption.

Example g of the stream depends only on (seed, g), so any host can produce any
slice of any global batch, and a resumed run sees the same examples; the trainer
streams it through the same threaded loader as the folder datasets.
"""

from __future__ import annotations

import numpy as np

from apl_jax.data.prompts import Templates, generic_pair, identity_pair
from apl_jax.tokenizer import tokenize

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40),
           "white": (235, 235, 235), "black": (20, 20, 20)}


class SyntheticExamples:
    """Random access to the synthetic example stream: example g is a function of (seed, g)."""

    def __init__(self, tokenizer, placeholder: str, templates: Templates, *, resolution: int, identity_prob: float,
                 num_names: int, num_captions: int, seed: int, num_vectors: int = 1):
        self.tokenizer, self.placeholder, self.templates = tokenizer, placeholder, templates
        self.prefix_extra = num_vectors - 1  # tokens the prefix adds at the placeholder (for the too-long warning)
        self.resolution, self.identity_prob, self.seed = resolution, identity_prob, seed
        self.names = [f"Synthetic Person {i}" for i in range(num_names)]
        colours = list(COLOURS)
        self.captions = [
            (f"a {fg} square on a {bg} background", fg, bg)
            for fg in colours for bg in colours if fg != bg
        ][:num_captions]

    def _face(self, name_index: int, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        scheme = np.random.default_rng([self.seed, 7919, name_index])
        skin, hair, background = (scheme.integers(40, 230, size=3) for _ in range(3))
        yy, xx = np.mgrid[0:r, 0:r] / r
        cy, cx = 0.55 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
        image = np.empty((r, r, 3), np.float32)
        image[:] = background
        image[((yy - cy) / 0.32) ** 2 + ((xx - cx) / 0.25) ** 2 < 1] = skin
        image[(yy < cy - 0.15) & (((yy - cy) / 0.4) ** 2 + ((xx - cx) / 0.3) ** 2 < 1)] = hair
        for ex in (cx - 0.1, cx + 0.1):
            image[((yy - cy + 0.05) ** 2 + (xx - ex) ** 2) < 0.0016] = 20
        return np.clip(image * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)

    def _scene(self, fg: str, bg: str, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        image = np.empty((r, r, 3), np.uint8)
        image[:] = COLOURS[bg]
        size = int(r * rng.uniform(0.3, 0.5))
        y, x = rng.integers(0, r - size, size=2)
        image[y : y + size, x : x + size] = COLOURS[fg]
        return image

    def drawn(self, index: int) -> tuple[np.ndarray, str, str]:
        """(image, private prompt, neutral prompt) of example `index`."""
        rng = np.random.default_rng([self.seed, index])
        if rng.random() < self.identity_prob:
            name_index = int(rng.integers(len(self.names)))
            private, neutral = identity_pair(self.names[name_index], self.placeholder, rng, self.templates)
            return self._face(name_index, rng), private, neutral
        caption, fg, bg = self.captions[int(rng.integers(len(self.captions)))]
        private, neutral = generic_pair(caption, self.placeholder)
        return self._scene(fg, bg, rng), private, neutral

    def example(self, index: int) -> dict[str, np.ndarray]:
        image, private, neutral = self.drawn(index)
        private_ids, neutral_ids = tokenize(self.tokenizer, [private, neutral], extra_tokens=[self.prefix_extra, 0])
        return {"pixels": image, "private_ids": private_ids, "neutral_ids": neutral_ids}

    def batch(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Examples start..start+count-1 stacked, as the training step's batch."""
        examples = [self.example(i) for i in range(start, start + count)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

