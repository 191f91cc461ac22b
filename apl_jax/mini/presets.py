"""The shipped APL-mini weights: the `apl-mini` and `apl-mini-ft` model presets and the recognizer.

weights/MANIFEST.json holds every file's sha256; loading checks them, so a damaged or
half-updated checkout is an error, not a silently different model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp

from apl_jax.errors import UserError

WEIGHTS_DIR = Path(__file__).parent / "weights"
BASE = "apl-mini"
FINE_TUNED = "apl-mini-ft"  # apl-mini with a UNet fine-tuned on another render style; shares the rest
UNET_FILE = "diffusion_flax_model.msgpack"
RECOGNIZER_FILE = "recognizer.msgpack"
MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder).as_posix()): _sha256(p) for p in _weight_files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1) + "\n")


def verify(folder: Path = WEIGHTS_DIR) -> None:
    """UserError unless every file listed in the manifest is present with its recorded hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{folder} has no {MANIFEST}: build APL-mini with `python -m apl_jax.mini build`")
    for name, digest in json.loads(manifest.read_text())["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"APL-mini weights file {path} is missing (listed in {manifest})")
        if _sha256(path) != digest:
            raise UserError(f"APL-mini weights file {path} does not match its sha256 in {manifest}; "
                            "restore it with git or rebuild with `python -m apl_jax.mini build`")


@functools.lru_cache(maxsize=1)
def _verified(folder: Path) -> Path:
    verify(folder)
    return folder


def apl_mini(dtype: str = "float32", folder: Path = WEIGHTS_DIR):
    from apl_jax.models import load_model

    return load_model(_verified(folder) / BASE, dtype)


def apl_mini_ft(dtype: str = "float32", folder: Path = WEIGHTS_DIR):
    model = apl_mini(dtype, folder)
    unet = flax.serialization.msgpack_restore((folder / FINE_TUNED / "unet" / UNET_FILE).read_bytes())
    unet = jax.tree.map(lambda x: jnp.asarray(x, model.dtype), unet)
    return dataclasses.replace(model, params={**model.params, "unet": unet})


def _half(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float16), jax.device_get(tree))


def save_recognizer(params, folder: Path) -> None:
    (folder / RECOGNIZER_FILE).write_bytes(flax.serialization.to_bytes(_half(params)))


def load_recognizer(folder: Path = WEIGHTS_DIR):
    params = flax.serialization.msgpack_restore((_verified(folder) / RECOGNIZER_FILE).read_bytes())
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def save_unet(model, folder: Path) -> None:
    """Only the UNet (float16): apl-mini-ft shares apl-mini's text encoder, VAE and scheduler."""
    sub = folder / "unet"
    sub.mkdir(parents=True, exist_ok=True)
    model.unet.save_config(sub)
    (sub / UNET_FILE).write_bytes(flax.serialization.to_bytes(_half(model.params["unet"])))
