"""Orbax checkpoints of the training state, the data position and the config.

The state {params, opt_state, step, rng} is saved unreplicated, as host arrays, so
it restores onto any device count. Only process 0 writes (and restores: the
trainer broadcasts the result), which keeps every other host off the file system.
A checkpoint that cannot be read, or that belongs to an incompatible run, is an
error: training never silently starts again from scratch.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from apl_jax.errors import UserError

# Config keys that fix the shapes of the saved state; the rest (steps, logging...) may change on resume.
STRUCTURAL_KEYS = (("model", "path"), ("prefix", "num_vectors"), ("prefix", "placeholder"), ("train", "grad_accum_steps"))


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int, config: dict[str, Any]):
        self.directory = Path(directory).absolute()
        self.config = config
        self.directory.mkdir(parents=True, exist_ok=True)  # orbax won't create it with active_processes set
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=False,
                enable_async_checkpointing=False,
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0}),
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: dict[str, Any], data_position: dict[str, Any]) -> None:
        """Save host state at its own step; orbax commits atomically (temp dir, then rename)."""
        step = int(state["step"])
        if step in self.manager.all_steps():
            return
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

    def restore(self, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, data position) of the latest checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        where = self.directory / str(step)
        try:
            saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            raise UserError(f"checkpoint {where} has no readable config ({_brief(err)}); it is corrupt: move it away to start over") from None
        self._check_compatible(saved_config, where)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
            )
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            raise UserError(f"checkpoint {where} cannot be restored ({_brief(err)}); it is corrupt: move it away to start over") from None
        state = jax.tree.map(np.asarray, restored["state"])
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(abstract)):
            if got.shape != want.shape:
                raise UserError(f"checkpoint {where}: {jax.tree_util.keystr(path)} has shape {got.shape}, this run expects {want.shape}")
        return state, restored["data"]

    def _check_compatible(self, saved: dict[str, Any], where: Path) -> None:
        for section, key in STRUCTURAL_KEYS:
            old, new = saved.get(section, {}).get(key), self.config[section][key]
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


def _brief(err: Exception) -> str:
    """The gist of a storage error; tensorstore appends a page-long JSON spec."""
    text = str(err).split(" [tensorstore_spec")[0]
    return f"{type(err).__name__}: {text[:300]}"


def read_prefix(path: str | Path) -> tuple[np.ndarray, str, int]:
    """(prefix, placeholder, step) from a workdir, its checkpoints/ folder, or one step's folder."""
    path = Path(path).absolute()
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
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            raise UserError(f"checkpoint {root / str(step)} cannot be read ({_brief(err)})") from None
    return np.asarray(restored["state"]["params"], np.float32), restored["config"]["prefix"]["placeholder"], step
