"""Prefix files for other tools, and models for diffusers' PyTorch side (formats: docs/design.md, section 3).

Formats:
- diffusers: safetensors, one key "<placeholder>" holding float32 [K, D], metadata
  format=pt. The brackets matter: "alz" is already a CLIP token and diffusers
  refuses tokens that are. AUTOMATIC1111 and ComfyUI read the same file.
- a1111 .pt: torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": [K, D]}, "name", "step"}).
- apl .pt: the official code's torch.save({"string_to_token": {"alz": tensor(41128)},
  "string_to_param": nn.ParameterDict({"alz": Parameter[K, D]})}).
Both .pt files are zips with only the entries torch 1.6-2.0 wrote, which AUTOMATIC1111's
safe unpickler requires; torch's weights-only loader reads them too. .pt files need
torch (an optional extra); everything else works without it.

    python -m apl_jax.export prefix --from SRC --to DST --format diffusers|a1111|apl [--force]
    python -m apl_jax.export model --model M --out DIR|FILE.safetensors [--format diffusers|single-file] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from apl_jax import preflight, storage
from apl_jax.cli import run_main
from apl_jax.errors import UserError
from apl_jax.files import atomic_write, save_safetensors

FORMATS = ("diffusers", "a1111", "apl")
SUFFIXES = {"diffusers": (".safetensors",), "a1111": (".safetensors", ".pt"), "apl": (".pt",)}
A1111_TOKEN_ID = 265  # A1111's "*" placeholder entry
# The zip entries torch 1.6 to 2.0 wrote. AUTOMATIC1111's safe unpickler (on by default)
# refuses a file with any other entry, such as the .format_version, .storage_alignment,
# byteorder and .data/serialization_id that torch >= 2.6 adds; torch reads files without them.
_CLASSIC_ZIP_ENTRY = re.compile(r"^[^/]+/(data\.pkl|version|data/\d+)$")


@dataclasses.dataclass
class PrefixFile:
    vectors: np.ndarray  # float32 [K, D]
    placeholder: str  # without brackets, e.g. "alz"
    format: str  # diffusers | a1111 | apl | checkpoint
    step: int | None = None


def diffusers_token(placeholder: str) -> str:
    return f"<{placeholder}>"


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            "reading or writing .pt prefix files needs torch: pip install torch "
            "(the CPU build is enough), or use the .safetensors format"
        ) from None
    return torch


# ---------------------------------------------------------------- writing

def save_diffusers_prefix(path: str | Path, prefix: np.ndarray, placeholder: str) -> Path:
    tensors = {diffusers_token(placeholder): np.ascontiguousarray(prefix, dtype=np.float32)}
    return save_safetensors(path, tensors, metadata={"format": "pt"})


def _save_a1111_pt(path: Path, prefix: PrefixFile) -> Path:
    torch = _torch()
    data = {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": torch.from_numpy(np.array(prefix.vectors, np.float32))},
        "name": path.stem,
        "step": prefix.step or 0,
    }
    return _torch_save(path, data)


def _save_apl_pt(path: Path, prefix: PrefixFile, token_id: int) -> Path:
    torch = _torch()
    param = torch.nn.Parameter(torch.from_numpy(np.array(prefix.vectors, np.float32)))
    data = {
        "string_to_token": {prefix.placeholder: torch.tensor(token_id)},
        "string_to_param": torch.nn.ParameterDict({prefix.placeholder: param}),
    }
    return _torch_save(path, data)


def _torch_save(path: Path, data) -> Path:
    """torch.save in the classic zip layout; a legacy non-zip file would not do for the
    official format: it pickles ParameterDict's source code, which weights-only loading refuses."""
    buffer = io.BytesIO()
    _torch().save(data, buffer)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(buffer) as full, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as classic:
            for entry in full.infolist():
                if _CLASSIC_ZIP_ENTRY.match(entry.filename):
                    classic.writestr(entry, full.read(entry))

    return atomic_write(path, write)


def _check_target(path: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if path.suffix not in SUFFIXES[fmt]:
        raise UserError(f"format {fmt} writes {' or '.join(SUFFIXES[fmt])} files, not {path.name}")


def _check_vectors(vectors: np.ndarray, source) -> None:
    # Tools that read the file index [K, D]; a 1-D or 3-D array would fail there, or in our report.
    if np.ndim(vectors) != 2:
        raise UserError(f"{source} holds an array of shape {tuple(np.shape(vectors))}, not a prefix: "
                        "a prefix is [K, D] (K vectors of the text encoder's width)")


def save_prefix(path: str | Path, prefix: PrefixFile, fmt: str) -> Path:
    path = Path(path)
    _check_target(path, fmt)
    _check_vectors(prefix.vectors, f"the {prefix.format} prefix")
    if path.suffix == ".safetensors":
        return save_diffusers_prefix(path, prefix.vectors, prefix.placeholder)
    if fmt == "a1111":
        return _save_a1111_pt(path, prefix)
    from apl_jax.tokenizer import load_tokenizer, tokenize

    tokenizer = load_tokenizer()
    if len(tokenizer.tokenize(prefix.placeholder)) != 1:
        raise UserError(f"the official format needs a single-token placeholder; {prefix.placeholder!r} is not one")
    return _save_apl_pt(path, prefix, int(tokenize(tokenizer, [prefix.placeholder])[0, 1]))


# ---------------------------------------------------------------- reading

def _single(mapping, path: Path, what: str):
    if len(mapping) != 1:
        raise UserError(f"{path} holds {len(mapping)} {what} ({', '.join(map(str, mapping))}); a prefix file has exactly one")
    return next(iter(mapping.items()))


def _load_safetensors(path: Path) -> PrefixFile:
    try:
        tensors = safetensors.numpy.load_file(path)
    except (OSError, safetensors.SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors file: {err}") from None
    key, vectors = _single(tensors, path, "tensors")
    placeholder = key[1:-1] if key.startswith("<") and key.endswith(">") else key
    return PrefixFile(np.asarray(vectors, np.float32), placeholder, "diffusers")


def _load_pt(path: Path) -> PrefixFile:
    torch = _torch()
    import pickle

    # Plain weights-only unpickling, plus the one class the official file contains. That is
    # safer than weights_only=False, which would run any pickled code.
    with torch.serialization.safe_globals([torch.nn.ParameterDict]):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise UserError(f"{path} is not a prefix .pt file torch can read safely: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "string_to_param" not in data:
        raise UserError(f"{path} is not a textual-inversion .pt file (no string_to_param)")
    official = isinstance(data["string_to_param"], torch.nn.ParameterDict)
    if official:
        print(f"note: {path} is in the official APL format; it was loaded with torch's weights-only unpickler "
              "allowing torch.nn.ParameterDict", file=sys.stderr)
    key, vectors = _single(dict(data["string_to_param"].items()), path, "embeddings")
    vectors = vectors.detach().float().numpy()
    if official:
        return PrefixFile(vectors, key, "apl")
    return PrefixFile(vectors, str(data.get("name", "alz")) if key == "*" else key, "a1111", data.get("step"))


def _load_checkpoint(path: Path) -> PrefixFile:
    from apl_jax.checkpoint import read_prefix

    vectors, placeholder, step = read_prefix(path)
    return PrefixFile(vectors, placeholder, "checkpoint", step)


def load_prefix(path: str | Path) -> PrefixFile:
    """Any prefix we write, auto-detected: safetensors, A1111 or official .pt, or an orbax checkpoint/workdir;
    local or on gs:// (a file is mirrored locally, a checkpoint read where it is)."""
    path = storage.path(path)
    if not path.exists():
        raise UserError(f"prefix source {path} does not exist")
    if path.is_dir():
        prefix = _load_checkpoint(path)
    elif path.suffix == ".safetensors":
        prefix = _load_safetensors(storage.local_copy(path))
    elif path.suffix in (".pt", ".bin"):
        prefix = _load_pt(storage.local_copy(path))
    else:
        raise UserError(f"{path}: unknown prefix format (expected .safetensors, .pt or a checkpoint folder)")
    _check_vectors(prefix.vectors, path)
    return prefix


# ---------------------------------------------------------------- CLI

def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")


def _prefix_command(args) -> int:
    _check_target(Path(args.to), args.format)
    preflight.file(args.to, "--to")
    _refuse_overwrite(Path(args.to), args.force)
    source = load_prefix(args.source)
    if args.placeholder:
        source.placeholder = args.placeholder
    written = save_prefix(args.to, source, args.format)
    print(f"wrote {written} ({args.format}, {source.vectors.shape[0]} x {source.vectors.shape[1]}, "
          f"placeholder {source.placeholder!r}, from {source.format})")
    return 0


def _model_command(args) -> int:
    from apl_jax.models import load_model

    out = preflight.folder(args.out, "--out")
    _refuse_overwrite(out, args.force)
    if args.format == "single-file":
        from apl_jax.single_file import check_output

        check_output(out)  # before the model loads, which takes a while for a real one
        load_model(args.model).save_single_file(out)
        print(f"wrote {out}: one SD 1.x checkpoint in the original layout (AUTOMATIC1111, ComfyUI, "
              "StableDiffusionPipeline.from_single_file)")
        return 0
    load_model(args.model).save(out, weights="pt")
    print(f"wrote {out}: a diffusers folder with PyTorch safetensors (StableDiffusionPipeline.from_pretrained)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apl_jax.export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prefix = commands.add_parser("prefix", help="convert a prefix between formats")
    prefix.add_argument("--from", dest="source", required=True, help="prefix file or orbax checkpoint / workdir")
    prefix.add_argument("--to", required=True, help="output file (.safetensors or .pt)")
    prefix.add_argument("--format", required=True, choices=FORMATS)
    prefix.add_argument("--placeholder", help="rename the placeholder (default: the source's)")
    prefix.add_argument("--force", action="store_true", help="overwrite an existing output")
    model = commands.add_parser("model", help="write a model for PyTorch tools: a diffusers folder or one file")
    model.add_argument("--model", required=True, help="a preset name, a model folder or a single-file checkpoint")
    model.add_argument("--out", required=True, help="a folder (diffusers) or a .safetensors file (single-file)")
    model.add_argument("--format", default="diffusers", choices=("diffusers", "single-file"),
                       help="diffusers: a diffusers folder with PyTorch weights (default); single-file: one "
                            "original-layout SD 1.x .safetensors")
    model.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    return _prefix_command(args) if args.command == "prefix" else _model_command(args)


if __name__ == "__main__":
    run_main(main)
