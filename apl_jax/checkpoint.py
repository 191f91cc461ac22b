"""Orbax checkpoints of the training state, the data position and the config.

The state {params, opt_state, step, rng, skipped_steps, nonfinite_step} is saved
unreplicated, as host arrays, so it restores onto any device count. Every process
takes part in save and restore, as orbax intends on many hosts: the checkpoint
folder must be storage they all see (gs://, or a shared file system); orbax has
the primary process write the host arrays and commit, and the others wait at its
barriers. Which host is primary does not matter, so a preempted host 0 that comes
back as a new machine resumes. A state with NaN or Inf is never saved. A corrupt newest
checkpoint is set aside and the newest intact one restored, with a warning; none
intact, or one that belongs to an incompatible run, is an error: training never
silently starts again from scratch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from apl_jax import nonfinite, storage
from apl_jax.errors import UserError

log = logging.getLogger(__name__)
# What a damaged checkpoint raises when orbax/tensorstore read it.
UNREADABLE = (ValueError, OSError, KeyError, json.JSONDecodeError)

# Config keys that fix the shapes of the saved state; the rest (steps, logging...) may change on resume.
STRUCTURAL_KEYS = (("model", "path"), ("prefix", "num_vectors"), ("prefix", "placeholder"), ("train", "grad_accum_steps"),
                   ("train", "lr_schedule"))
# What a checkpoint written before a structural key existed was trained with.
BEFORE_THE_KEY = {("train", "lr_schedule"): "constant"}


class _Corrupt(Exception):
    """A checkpoint that cannot be read back (the message says why)."""


class Checkpointer:
    def __init__(self, directory, keep: int, config: dict[str, Any]):
        if keep < 1:  # orbax would delete every checkpoint right after saving it
            raise UserError(f"train.keep_checkpoints must be >= 1, got {keep}")
        directory = storage.path(directory)
        self.directory = directory if storage.is_remote(directory) else directory.absolute()
        self.config = config
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: dict[str, Any], data_position: dict[str, Any]) -> storage.AnyPath:
        """Save host state at its own step, on every process; orbax commits atomically (a temp
        folder renamed locally; a commit marker file on GCS, which has no rename).

        Returns the checkpoint's folder, checked to be on disk."""
        step = int(state["step"])
        nonfinite.require_finite(state, f"the training state of step {step}")
        if step in self.manager.all_steps():
            return self.directory / str(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_position),
                config=ocp.args.JsonSave(self.config),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        self.manager.reload()  # what is on disk, not what orbax meant to write
        if step not in self.manager.all_steps():
            raise RuntimeError(f"orbax reported checkpoint {step} saved, but {self.directory} does not hold it")
        return self.directory / str(step)

    def restore(self, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, data position) of the newest intact checkpoint, or None when there is none.

        Corrupt newer ones are moved to corrupt-checkpoints/ next to the checkpoint folder,
        so that training can save those steps again."""
        corrupt = []  # (step, why), newest first
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_closed_loop():
                    restored = self._restore(step, template)
            except _Corrupt as err:
                corrupt.append((step, str(err)))
                continue
            if corrupt:
                self._set_aside(corrupt, step)
            return restored
        if corrupt:
            reasons = "; ".join(f"step {step}: {why}" for step, why in corrupt)
            raise UserError(f"no checkpoint in {self.directory} can be restored: {reasons}; move {self.directory} "
                            "away to train again from step 0")
        return None

    def _restore(self, step: int, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        where = self.directory / str(step)
        try:
            saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except UNREADABLE as err:
            raise _Corrupt(f"its config cannot be read ({_brief(err)})") from None
        self._check_compatible(saved_config, where)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._read(step, abstract)
            state = jax.tree.map(np.asarray, restored["state"])
        except UNREADABLE as err:
            # A run from before the NaN guard saved no guard counters: read it without them, counters at 0.
            before_guard = {k: v for k, v in abstract.items() if k not in nonfinite.FIELDS}
            try:
                restored = self._read(step, before_guard)
            except UNREADABLE:
                raise _Corrupt(f"its state cannot be read ({_brief(err)})") from None
            state = {**jax.tree.map(np.asarray, restored["state"]), **nonfinite.initial_fields()}
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(abstract)):
            if got.shape != want.shape:
                raise UserError(f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {got.shape}, this run expects {want.shape}")
        bad = nonfinite.nonfinite_leaves(state)
        if bad:  # written before the guard existed, or damaged on disk
            raise _Corrupt(f"its state holds NaN or Inf in {', '.join(bad)}")
        return state, restored["data"]

    def _read(self, step: int, abstract_state: dict[str, Any]) -> dict[str, Any]:
        return self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )

    def _set_aside(self, corrupt: list[tuple[int, str]], restored: int) -> None:
        """Process 0 moves the corrupt folders (on GCS a copy and delete per object); all wait for it."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "corrupt-checkpoints"
            aside.mkdir(parents=True, exist_ok=True)
            for step, why in corrupt:
                # An earlier fallback may have set aside the same step number.
                names = itertools.chain([str(step)], (f"{step}.{n}" for n in itertools.count(1)))
                target = next(aside / name for name in names if not (aside / name).exists())
                (self.directory / str(step)).rename(target)
                log.warning("checkpoint %s is corrupt: %s; restored the newest intact one, %s, and moved the corrupt one "
                            "to %s", self.directory / str(step), why, self.directory / str(restored), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("apl_jax checkpoints set aside")
        self.manager.reload()

    def _check_compatible(self, saved: dict[str, Any], where: storage.AnyPath) -> None:
        keys = STRUCTURAL_KEYS
        if self.config["train"]["lr_schedule"] != "constant":  # a decaying rate ends at train.steps
            keys += (("train", "steps"),)
        for section, key in keys:
            old, new = saved.get(section, {}).get(key, BEFORE_THE_KEY.get((section, key))), self.config[section][key]
            if old != new:
                raise UserError(
                    f"checkpoint {where} was written with {section}.{key}={old!r}, this run has {new!r}: "
                    f"use another --workdir, or set {section}.{key}={old!r} to resume"
                )

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _quiet_closed_loop():
    """Drop the "Event loop is closed" tracebacks of a failed read: tensorstore still completes the
    other reads into the event loop orbax has closed, and each would print a traceback."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _brief(err: Exception) -> str:
    """The gist of a storage error; tensorstore appends a page-long JSON spec."""
    text = str(err).split(" [tensorstore_spec")[0]
    return f"{type(err).__name__}: {text[:300]}"


def read_prefix(path) -> tuple[np.ndarray, str, int]:
    """(prefix, placeholder, step) from a workdir, its checkpoints/ folder, or one step's folder (local or gs://)."""
    path = storage.path(path)
    path = path if storage.is_remote(path) else path.absolute()
    if (path / "checkpoints").is_dir():
        root, step = path / "checkpoints", None
    elif path.name.isdigit() and (path / "state").is_dir():
        root, step = path.parent, int(path.name)
    else:
        root, step = path, None
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("state", "data", "config"))
    with contextlib.closing(manager):
        step = manager.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{path} holds no checkpoint (expected a workdir, its checkpoints/ folder or checkpoints/STEP)")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                     config=ocp.args.JsonRestore()))
        except UNREADABLE as err:
            raise UserError(f"checkpoint {root / str(step)} cannot be read ({_brief(err)})") from None
    return np.asarray(restored["state"]["params"], np.float32), restored["config"]["prefix"]["placeholder"], step
