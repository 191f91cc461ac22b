"""The non-finite guard: a NaN or Inf loss, gradient or update never reaches the saved state.

On device, every step checks that its loss, its gradients and the updated params and
optimizer state are all finite. A step that is not keeps the old params and optimizer
state and is counted in state["skipped_steps"]; under train.nan_policy=stop it also
records the first such step in state["nonfinite_step"]. The host reads both only when
it syncs anyway (logged steps, checkpoints), so the guard costs no extra sync, and turns
nonfinite_step into an error naming the step. Before every save or export the host
checks the state itself once more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from apl_jax.errors import UserError

# Added to the training state: steps whose update was dropped, and (nan_policy=stop) the first of them, 0 if none.
FIELDS = ("skipped_steps", "nonfinite_step")


def initial_fields() -> dict[str, np.ndarray]:
    return {name: np.int32(0) for name in FIELDS}


def _floats(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def all_finite(*trees) -> jax.Array:
    """On device: True when every float in the trees is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for tree in trees for x in _floats(tree)]))


def guard(old: dict, new: dict, loss, grads, nan_policy: str) -> dict:
    """The new state, or (when anything is not finite) the old params and optimizer state with the step counted.

    `loss` and `grads` must be the device-averaged ones, so every device takes the same branch.
    """
    finite = all_finite(loss, grads, new["params"], new["opt_state"])
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (new["params"], new["opt_state"]),
                        (old["params"], old["opt_state"]))
    first = old["nonfinite_step"]
    if nan_policy == "stop":
        first = jnp.where(finite | (first > 0), first, new["step"])
    return {**new, "params": kept[0], "opt_state": kept[1],
            "skipped_steps": old["skipped_steps"] + (~finite).astype(jnp.int32), "nonfinite_step": first}


def check_stop(values: dict) -> None:
    """On the host, from a step's metrics: the error of nan_policy=stop, once a step was not finite."""
    step = int(values["nonfinite_step"])
    if step:
        raise UserError(f"step {step}: the loss, a gradient or the update is NaN or Inf; stopped (train.nan_policy=stop) "
                        f"without saving or exporting anything of step {step} or later. Lower train.learning_rate, "
                        "or set train.nan_policy=skip to skip such steps")


def nonfinite_leaves(tree) -> list[str]:
    """On the host: the paths of the leaves that hold NaN or Inf."""
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all()]


def require_finite(tree, what: str) -> None:
    """On the host: refuse to write a state or prefix that holds NaN or Inf."""
    bad = nonfinite_leaves(tree)
    if bad:
        raise UserError(f"{what} holds NaN or Inf (in {', '.join(bad)}); it was not written")
