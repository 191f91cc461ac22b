"""CLIP score: 100 x the cosine between an image's and its prompt's CLIP embeddings.

The prompt is always the original one, never the prefixed one: the score asks
whether the prefix keeps the image faithful to what the user wrote. Images go
through CLIP's own preprocessing (shorter side resized bicubically to the model's
input size, centre crop, CLIP's mean/std); the official APL script skipped that.
The model is a transformers CLIP folder (e.g. openai/clip-vit-large-patch14) with
flax_model.msgpack or model.safetensors, read without torch into our CLIPModel (apl_jax/nn/clip.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import flax.serialization
import jax
import numpy as np
import safetensors.numpy
from transformers import CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from apl_jax import convert
from apl_jax.errors import UserError
from apl_jax.nn.clip import CLIPConfig, CLIPModel
from apl_jax.tokenizer import load_tokenizer, tokenize

SCALE = 100  # the customary reporting scale
BATCH = 8  # images or prompts per compiled call; the last batch is padded, so one program each


class ClipScorer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"CLIP model folder {folder} has no config.json (expected a transformers CLIP folder)")
        if not any((folder / name).is_file() for name in ("flax_model.msgpack", "model.safetensors")):
            raise UserError(f"CLIP model folder {folder} has no flax_model.msgpack or model.safetensors")
        try:
            config = CLIPConfig.from_json(json.loads((folder / "config.json").read_text()))
            self.model = CLIPModel(config)
            self.params = _read_params(folder, jax.eval_shape(self.model.init_weights, jax.random.PRNGKey(0)))
        except (OSError, ValueError, safetensors.SafetensorError) as err:
            raise UserError(f"CLIP model folder {folder} could not be loaded: {str(err).splitlines()[0]}") from None
        has_vocab = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        self.tokenizer = load_tokenizer(folder if has_vocab else None)
        size = config.vision.image_size
        if (folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        else:
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                resample=PILImageResampling.BICUBIC, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
            )
        self._image_features = jax.jit(
            lambda params, pixels: self.model.apply({"params": params}, pixels, method=CLIPModel.image_features))
        self._text_features = jax.jit(
            lambda params, ids: self.model.apply({"params": params}, ids, method=CLIPModel.text_features))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 3, S, S], CLIP's input."""
        inputs = self.processor(images=list(images), return_tensors="np", input_data_format="channels_last")
        return inputs["pixel_values"].astype(np.float32)

    def _batched(self, features, inputs: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(inputs), BATCH):
            chunk = inputs[start : start + BATCH]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], BATCH - len(chunk), axis=0)])
            out.append(np.asarray(features(self.params, padded))[: len(chunk)])
        vectors = np.concatenate(out).astype(np.float64)
        return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        """Unit vectors [N, P]."""
        return self._batched(self._image_features, self.preprocess(images))

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit vectors [N, P]."""
        return self._batched(self._text_features, tokenize(self.tokenizer, list(prompts)))

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """SCALE x cosine per (image, prompt) pair; pass the prompts as the user wrote them, without the prefix."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        text = self.text_embeddings(unique)[[unique.index(p) for p in prompts]]
        return SCALE * np.sum(self.image_embeddings(images) * text, axis=-1)


def _read_params(folder: Path, expected) -> dict[str, Any]:
    """Flax msgpack, or PyTorch safetensors renamed by convert's table; ValueError if they do not fit the config."""
    if (folder / "flax_model.msgpack").is_file():
        params = flax.serialization.msgpack_restore((folder / "flax_model.msgpack").read_bytes())
    else:
        params = convert.pt_to_flax(safetensors.numpy.load_file(folder / "model.safetensors").items(), expected)
    problems = convert.shape_mismatches(params, expected)
    if problems:
        raise ValueError(f"its weights do not match its config.json: {problems[0]}")
    return params
