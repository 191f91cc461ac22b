"""sha256 manifests of shipped weight folders: written by the build, checked on every load.

A folder with a MANIFEST.json is verified before use, so a damaged or half-updated
checkout is a one-line error instead of a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from apl_jax.errors import UserError

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[Path]:
    # followlinks: a fine-tuned model's folder links the parts it shares with its base
    return sorted(Path(root) / name for root, _, names in os.walk(folder, followlinks=True)
                  for name in names if name != MANIFEST)


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1) + "\n")


def verify(folder: Path) -> None:
    """UserError unless every file listed in folder/MANIFEST.json is present with its recorded hash."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{folder} has no {MANIFEST}")
    for name, digest in json.loads(manifest.read_text())["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"weights file {path} is missing (listed in {manifest})")
        if _sha256(path) != digest:
            raise UserError(f"weights file {path} does not match its sha256 in {manifest}; "
                            "restore it with git or rebuild it")
