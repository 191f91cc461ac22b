"""Offline CLIP tokenizer.

No hub access here, so the vocabulary ships with the package. `vocab.json` and
`merges.txt` are generated from the BPE file that open-clip-torch ships; rerun
`python -m apl_jax.tokenizer` to regenerate them.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

MAX_LENGTH = 77
NUM_MERGES = 48894  # lines 1..48894 of the BPE file; the rest are unused by CLIP
ASSET_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
log = logging.getLogger(__name__)
_warned: set[str] = set()  # prompts already reported as cut: once per prompt, not once per step


def open_clip_bpe_path() -> Path:
    """The BPE file inside open-clip-torch, found without importing it (that needs torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed: pip install --no-deps open-clip-torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def build_vocab_files(bpe_path: Path, out_dir: Path) -> None:
    """Write vocab.json and merges.txt in the layout CLIPTokenizer reads."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """The tokenizer of a model folder, or the shipped CLIP vocabulary."""
    folder = Path(folder) if folder is not None else ASSET_DIR
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], extra_tokens: int | Sequence[int] = 0) -> np.ndarray:
    """Prompts -> int32 ids [N, 77], padded with end-of-text as SD 1.x does.

    A prompt that does not fit in 77 tokens is cut; so is one that fits only without
    its `extra_tokens` (per prompt, or one number for all), the K-1 more tokens a
    K-vector prefix adds later at its placeholder. Either gets a warning naming it, once.
    """
    ids = np.asarray(tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH).input_ids,
                     dtype=np.int32)
    for prompt, row, extra in zip(prompts, ids, np.broadcast_to(extra_tokens, len(prompts))):
        length = int(np.argmax(row == tokenizer.eos_token_id)) + 1  # with start and end of text
        if length == MAX_LENGTH:  # no padding left: exactly 77 tokens, or cut
            length = len(tokenizer.tokenize(prompt)) + 2
        if length + extra > MAX_LENGTH and prompt not in _warned:
            _warned.add(prompt)
            with_prefix = f" with the prefix's {extra} extra tokens" if extra else ""
            log.warning("prompt cut at %d tokens (it has %d%s); the text encoder never sees the rest: %r",
                        MAX_LENGTH, length + extra, with_prefix, prompt)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the shipped CLIP vocabulary from open-clip-torch's BPE file.")
    parser.add_argument("--bpe", type=Path, default=None, help="BPE file (default: the one in open-clip-torch)")
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args()
    build_vocab_files(args.bpe or open_clip_bpe_path(), args.out)
    print(f"wrote {args.out}/vocab.json and merges.txt")


if __name__ == "__main__":
    main()
