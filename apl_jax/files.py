"""Writing output files: atomically, and with the permissions the user's umask gives open().

safetensors' own save_file writes through a private temporary file and leaves mode
0600, which another user (or a web UI running as its own user) cannot read. So
every safetensors file we write goes through save_safetensors: the bytes are
built in memory and written with a plain open(), like every other file we write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import safetensors.numpy


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp) the file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)  # never leave a half-written file under the real name
    return path


def save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    data = safetensors.numpy.save(dict(tensors), metadata=dict(metadata))
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
