"""User paths that may be local or on Google Cloud Storage (gs://bucket/...).

A TPU pod's hosts share no disk, only a bucket, so every path a user names may be
a gs:// URL. Local paths stay pathlib.Path (behaviour unchanged); gs:// paths are
etils.epath paths, which reach GCS through fsspec/gcsfs and offer the same methods
(read_bytes, write_text, mkdir, exists, iterdir, /). Orbax writes its array data
to the same URLs through tensorstore's own GCS driver.

Readers that need a real local file (model weights, image folders for the dataset
builders) get one through local_copy: the remote folder is mirrored once into a
local cache keyed by the URL.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Union

from etils import epath

from apl_jax.errors import UserError

SCHEME = "gs://"
# pathlib.Path for local paths, epath.Path for gs:// ones: both have pathlib's methods.
AnyPath = Union[Path, epath.Path]
LOCAL_MIRROR = Path("~/.cache/apl_jax/gcs").expanduser()


def is_remote(path) -> bool:
    return str(path).startswith(SCHEME)


def path(value) -> AnyPath:
    """A user's path: gs://... as an epath.Path, anything else as a pathlib.Path with ~ expanded."""
    if is_remote(value):
        return epath.Path(str(value))
    return Path(value).expanduser()


def mirror_folder(value) -> Path:
    """The local folder that stands for a gs:// URL on this host (nothing is downloaded)."""
    return LOCAL_MIRROR / hashlib.sha256(str(value).encode()).hexdigest()[:16] / str(value).rstrip("/").split("/")[-1]


def local_copy(value) -> Path:
    """A local path to read `value` from: itself if local, else a mirror of the remote file or folder.

    The mirror lives under LOCAL_MIRROR/<hash of the URL>/ and is refreshed file by file
    when a remote file's size differs, so a rerun does not download unchanged weights again.
    """
    if not is_remote(value):
        return Path(value).expanduser()
    source = epath.Path(str(value))
    target = mirror_folder(value)
    if source.is_file():
        pairs = [(source, target)]
    else:  # walk, not rglob: epath refuses recursive globs on GCS; walk's roots come without the scheme
        bare = str(source)[len(SCHEME):]
        pairs = [(source / relative / name, target / relative / name) for root, _, names in source.walk()
                 for relative in [posixpath.relpath(str(root).removeprefix(SCHEME), bare)] for name in names]
    for remote, local in pairs:
        if local.is_file() and local.stat().st_size == remote.stat().length:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=local.name + ".")
        with os.fdopen(fd, "wb") as f:
            f.write(remote.read_bytes())
        os.replace(tmp, local)
    return target


def require_credentials(value) -> None:
    """A UserError unless Google Cloud credentials are found (or an emulator is set), for a gs:// path.

    Checked up front: without credentials gcsfs falls back to anonymous access and the
    first write fails deep inside a library."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise UserError(f"{value} is on Google Cloud Storage, but no credentials were found: run "
                        "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or run on a "
                        "Google Cloud VM with a service account") from None


def check_writable(folder: epath.Path, what: str) -> None:
    """Write and delete a probe object under a gs:// folder: one UserError if the bucket is missing or read-only."""
    from gcsfs.retry import HttpError

    require_credentials(folder)
    bucket = SCHEME + str(folder)[len(SCHEME):].split("/")[0]
    probe = folder / f".apl-jax-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except FileNotFoundError:
        raise UserError(f"{what} {folder}: bucket {bucket} does not exist (create it with `gcloud storage buckets "
                        f"create {bucket}`)") from None
    except (OSError, HttpError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} {folder} is not writable: cannot create objects in {bucket} ({reason})") from None
