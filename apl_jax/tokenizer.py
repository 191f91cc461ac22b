"""Offline CLIP tokenizer, our own.

No hub access here, so the vocabulary ships with the package. `vocab.json` and
`merges.txt` are generated from the BPE file that open-clip-torch ships; rerun
`python -m apl_jax.tokenizer` to regenerate them.

`ClipTokenizer` gives the ids of transformers 4's (slow) CLIPTokenizer without ftfy, which
this project used before: transformers 5 keeps only the `tokenizers`-backed CLIPTokenizer,
whose text cleaning differs (it keeps control characters and does not split CJK characters
apart), so its ids differ on such prompts. It reads and writes the same folder files.
"""

from __future__ import annotations

import argparse
import gzip
import functools
import importlib.util
import json
import logging
import shutil
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
import regex

MAX_LENGTH = 77
NUM_MERGES = 48894  # lines 1..48894 of the BPE file; the rest are unused by CLIP
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # EOS also pads (SD 1.x) and stands for unknown tokens
SPECIAL = regex.compile(f"({regex.escape(BOS)}|{regex.escape(EOS)})")
# CLIP's pre-tokenizer: contractions, letter runs, single digits, other non-space runs
WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                      regex.IGNORECASE)
# The CJK ideograph blocks that get spaces around each character, as BERT's BasicTokenizer does
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
ASSET_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
log = logging.getLogger(__name__)
_warned: set[str] = set()  # prompts already reported as cut: once per prompt, not once per step


def open_clip_bpe_path() -> Path:
    """The BPE file inside open-clip-torch, found without importing it (that needs torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed: pip install --no-deps open-clip-torch")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _clean(text: str) -> str:
    """transformers' CLIP text cleaning without ftfy (BERT's BasicTokenizer, no accent stripping):
    drop control characters, space out CJK ideographs, NFC, collapse whitespace, lowercase."""
    chars = []
    for c in text:
        category = unicodedata.category(c)
        if c in " \t\n\r" or category == "Zs":
            chars.append(" ")
        elif ord(c) in (0, 0xFFFD) or category.startswith("C"):
            continue
        elif any(low <= ord(c) <= high for low, high in CJK):
            chars.append(f" {c} ")
        else:
            chars.append(c)
    return " ".join(word.lower() for word in unicodedata.normalize("NFC", "".join(chars)).split())


class ClipTokenizer:
    """CLIP's byte-level BPE over a folder's vocab.json and merges.txt."""

    def __init__(self, vocab_file: Path, merges_file: Path):
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        self.encoder: dict[str, int] = json.loads(self.vocab_file.read_text(encoding="utf-8"))
        # the first line is the "#version" header; CLIP uses NUM_MERGES merges at most
        merges = self.merges_file.read_text(encoding="utf-8").strip().split("\n")[1 : NUM_MERGES + 1]
        self.ranks = {tuple(merge.split()): rank for rank, merge in enumerate(merges)}
        self.bos_token_id, self.eos_token_id = self.encoder[BOS], self.encoder[EOS]
        self._words: dict[str, tuple[str, ...]] = {}  # BPE of each word seen: prompts repeat words

    def __len__(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        if word not in self._words:
            self._words[word] = self._merge(word)
        return self._words[word]

    def _merge(self, word: str) -> tuple[str, ...]:
        """Merge the lowest-ranked adjacent pair, all its occurrences left to right, until none is in the merges."""
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if parts[i : i + 2] == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return parts

    def tokenize(self, text: str) -> list[str]:
        """BPE tokens, e.g. "alz" -> ["alz</w>"]; the special tokens written in the text stay whole."""
        byte_chars = bytes_to_unicode()
        tokens = []
        for piece in SPECIAL.split(text):
            if piece in (BOS, EOS):
                tokens.append(piece)
                continue
            for word in WORDS.findall(_clean(piece)):
                tokens.extend(self._bpe("".join(byte_chars[b] for b in word.encode("utf-8"))))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids without start and end of text; unknown tokens become end-of-text, as in CLIP."""
        return [self.encoder.get(token, self.eos_token_id) for token in self.tokenize(text)]

    def save_pretrained(self, folder: str | Path) -> None:
        """The folder layout transformers' CLIPTokenizer.from_pretrained reads (4.x and 5.x)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_file, folder / "vocab.json")
        shutil.copyfile(self.merges_file, folder / "merges.txt")
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "errors": "replace",
                  "clean_up_tokenization_spaces": False, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_vocab_files(bpe_path: Path, out_dir: Path) -> None:
    """Write vocab.json and merges.txt in the layout CLIPTokenizer reads."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path | None = None) -> ClipTokenizer:
    """The tokenizer of a model folder, or the shipped CLIP vocabulary."""
    folder = Path(folder) if folder is not None else ASSET_DIR
    return ClipTokenizer(folder / "vocab.json", folder / "merges.txt")


def tokenize(tokenizer: ClipTokenizer, prompts: list[str], extra_tokens: int | Sequence[int] = 0) -> np.ndarray:
    """Prompts -> int32 ids [N, 77], padded with end-of-text as SD 1.x does.

    A prompt that does not fit in 77 tokens is cut; so is one that fits only without
    its `extra_tokens` (per prompt, or one number for all), the K-1 more tokens a
    K-vector prefix adds later at its placeholder. Either gets a warning naming it, once.
    """
    ids = np.full((len(prompts), MAX_LENGTH), tokenizer.eos_token_id, np.int32)
    for row, prompt, extra in zip(ids, prompts, np.broadcast_to(extra_tokens, len(prompts))):
        tokens = tokenizer.encode(prompt)
        row[0] = tokenizer.bos_token_id
        row[1 : MAX_LENGTH - 1][: len(tokens)] = tokens[: MAX_LENGTH - 2]  # end of text follows (the fill)
        length = len(tokens) + 2  # with start and end of text
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
