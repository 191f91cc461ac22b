"""Writing output files: atomically, and with the permissions the user's umask gives open().

safetensors' own save_file writes through a private temporary file and leaves mode
0600, which another user (or a web UI running as its own user) cannot read. So
every safetensors file we write goes through save_safetensors: the bytes are
built in memory and written with a plain open(), like every other file we write.

On gs:// there is no rename; an object only appears once its upload completes, so
a remote file is written locally and uploaded whole, which is atomic already.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import safetensors.numpy

from apl_jax import storage


def atomic_write(path, write: Callable[[Path], object]) -> storage.AnyPath:
    """write(tmp) the file next to `path`, then rename it into place (gs://: upload it whole)."""
    if storage.is_remote(path):
        path = storage.path(path)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / path.name
            write(local)
            path.write_bytes(local.read_bytes())
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)  # never leave a half-written file under the real name
    return path


def save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    data = safetensors.numpy.save(dict(tensors), metadata=dict(metadata))
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
