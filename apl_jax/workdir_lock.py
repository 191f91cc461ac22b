"""One run per workdir: WORKDIR/lock, holding the PID and host of the run that owns it.

Two runs on one workdir would interleave their metrics and overwrite each other's
checkpoints, so a second run stops with an error naming the holder. A lock left by
a killed run (its PID gone, on this host) is taken over with a warning; a lock from
another host cannot be checked and always counts as held.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from apl_jax.errors import UserError

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class WorkdirLock:
    """Held from __enter__ to __exit__ (a context manager); the workdir must exist."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def _create(self) -> bool:
        """Create the lock file with our owner record; False if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.owner, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return True

    def _holder(self) -> dict | None:
        """The record in the lock file; None if it is gone, an error if it cannot be read."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise UserError(f"{self.path} exists but cannot be read; if no run is using {self.path.parent}, "
                            "delete it and start again") from None
        if not (isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)):
            raise UserError(f"{self.path} does not name a pid and host; if no run is using {self.path.parent}, "
                            "delete it and start again")
        return holder

    def __enter__(self) -> "WorkdirLock":
        for _ in range(2):  # a second try after taking over a stale lock (or one that vanished)
            if self._create():
                return self
            holder = self._holder()
            if holder is None:
                continue
            # Our own pid cannot hold it: a killed run of an earlier container that had the same pid did.
            if holder["host"] == self.owner["host"] and (holder["pid"] == self.owner["pid"] or not _alive(holder["pid"])):
                log.warning("taking over %s: its run (pid %d on %s) is gone", self.path, holder["pid"], holder["host"])
                self.path.unlink(missing_ok=True)
                continue
            raise UserError(
                f"workdir {self.path.parent} is in use by another run (pid {holder['pid']} on {holder['host']}, "
                f"since {holder.get('since', '?')}); wait for it to end or use another --workdir "
                f"(if that run is gone, delete {self.path})"
            )
        raise UserError(f"could not take {self.path}: another run keeps taking it")

    def __exit__(self, *exc) -> None:
        # Remove only our own lock: never one that a later run took over (e.g. after a pid check gone wrong).
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and {k: holder.get(k) for k in self.owner} == self.owner:
            self.path.unlink(missing_ok=True)
