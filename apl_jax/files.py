"""Writing output files: atomically, and with the permissions the user's umask gives open().

safetensors' own save_file writes through a private temporary file and leaves mode
0600, which another user (or a web UI running as its own user) cannot read. So
every safetensors file we write goes through save_safetensors: the bytes are
built in memory and written with a plain open(), like every other file we write.

On gs:// there is no rename; an object only appears once its upload completes, so
a remote file is written locally and uploaded whole, which is atomic already.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import ml_dtypes
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


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of a .safetensors file, in file order, each read into a buffer of its own.

    safetensors' own reader memory-maps the file, and the mapped pages count as the process's
    memory until the file is closed: loading SD 1.5's UNet that way holds its 3.4 GB twice.
    Raises ValueError for a file that is not valid safetensors.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            for name, entry in entries:
                array = np.empty(entry["shape"], _SAFETENSORS_DTYPES[entry["dtype"]])
                start, end = entry["data_offsets"]
                if end - start != array.nbytes:
                    raise ValueError(f"{name} has {end - start} bytes for shape {entry['shape']} {entry['dtype']}")
                f.seek(8 + size + start)
                if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                    raise ValueError(f"the file ends inside {name}")
                yield name, array
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"bad header ({type(err).__name__}: {err})") from None
