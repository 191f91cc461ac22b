"""Start-up checks of command-line outputs and numbers, made before any model loads.

A bad output path found after minutes of sampling or training loses that work, so
every CLI checks its output folders and files here first: the right kind (file or
folder), writable, a known image extension. The argparse types refuse numbers that
cannot work (a batch size of 0, a seed JAX cannot hold). Each problem is one UserError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from apl_jax import storage
from apl_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what PIL writes by the file name
# jax.random.PRNGKey keeps 32 bits without jax_enable_x64: seeds 2**32 and 0 give the same key.
MAX_SEED = 2**32 - 1


def _writable_folder(folder: Path, what: str, path: Path) -> None:
    """Files can be created in `folder` (an existing folder or the first existing one above it)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file")
    try:
        # Try it: permission bits say nothing about read-only mounts, ACLs or root.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{what} {path} is not writable: cannot create files in {existing} ({err.strerror})") from None


def folder(path, what: str) -> storage.AnyPath:
    """An output folder: absent (it will be made) or a folder, and writable (gs://: the bucket exists and
    takes writes, with the credentials found)."""
    if storage.is_remote(path):
        path = storage.path(path)
        storage.check_writable(path, what)
        return path
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    _writable_folder(path.absolute(), what, path)
    return path


def file(path, what: str, suffixes: tuple[str, ...] | None = None) -> storage.AnyPath:
    """An output file: not a folder, with one of `suffixes` (if given), in a writable folder (local or gs://)."""
    path = storage.path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name in it")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{what} {path} must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}"
                        if len(suffixes) > 1 else f"{what} {path} must end in {suffixes[0]}")
    if storage.is_remote(path):
        storage.check_writable(path.parent, what)
    else:
        _writable_folder(path.absolute().parent, what, path)
    return path


def image_file(path, what: str) -> storage.AnyPath:
    return file(path, what, IMAGE_SUFFIXES)


# ---------------------------------------------------------------- argparse types (a UserError is one line)


def seed(text: str) -> int:
    value = _integer(text, "--seed")
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}] (JAX keys hold 32 bits), got {value}")
    return value


def at_least(low: int, flag: str) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        value = _integer(text, flag)
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
        return value

    return parse


def _integer(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer, got {text!r}") from None
