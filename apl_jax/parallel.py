"""Data parallelism: the pmapped update step, replication and multi-host start-up.

Knows nothing about APL: it takes any `loss_fn(params, frozen, batch, keys)`.
Every use of pmap lives here, so moving to jit over a mesh touches this module only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from apl_jax import nonfinite
from apl_jax.config import ParallelConfig
from apl_jax.errors import UserError

AXIS = "batch"
log = logging.getLogger(__name__)

# Cluster environments where jax.distributed.initialize() finds its own arguments.
_AUTODETECT_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(config: ParallelConfig) -> None:
    """Join a multi-host run (before any other JAX call); a no-op on a single host."""
    given = [config.coordinator_address, config.num_processes, config.process_id]
    if all(v is None for v in given):
        if any(os.environ.get(name) for name in _AUTODETECT_ENV):
            jax.distributed.initialize()
        return
    if any(v is None for v in given):
        raise UserError("set all of parallel.coordinator_address, parallel.num_processes and parallel.process_id, or none")
    if not 0 <= config.process_id < config.num_processes:
        raise UserError(f"parallel.process_id={config.process_id} must be in 0..{config.num_processes - 1}")
    # CPU collectives across processes need gloo; the setting only concerns the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def per_device_batch(global_batch: int) -> int:
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch < 1 or global_batch % devices:
        raise UserError(
            f"train.batch_size={global_batch} does not divide across {devices} devices "
            f"({processes} process(es) x {jax.local_device_count()} local): use a multiple of {devices}"
        )
    return global_batch // devices


def _sharding() -> jax.sharding.NamedSharding:
    """Leading axis over all devices (every process), in pmap's device order."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def _local_positions() -> list[int]:
    """Where this process's devices sit along the global device axis."""
    me = jax.process_index()
    return [i for i, d in enumerate(jax.devices()) if d.process_index == me]


def host_example_range(global_batch: int) -> tuple[int, int]:
    """(first, count) of this host's examples within each global batch, in device order."""
    positions = _local_positions()
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise RuntimeError(f"process {jax.process_index()} owns non-contiguous device positions {positions}")
    per_device = per_device_batch(global_batch)
    return positions[0] * per_device, len(positions) * per_device


def _global_array(local_rows: list[np.ndarray]) -> jax.Array:
    """One [1, ...] row per local device -> a global [devices, ...] array, no host-side copies."""
    devices = [jax.devices()[i] for i in _local_positions()]
    shards = [jax.device_put(row, d) for row, d in zip(local_rows, devices)]
    return jax.make_array_from_single_device_arrays((jax.device_count(), *local_rows[0].shape[1:]), _sharding(), shards)


def replicate(tree: Any) -> Any:
    """Copy a pytree to every device, once, as pmap's [devices, ...] arrays.

    Each device gets its copy straight from the source: no host-side stack of
    N copies (for SD that would be N x 3.4 GB).
    """
    n = jax.local_device_count()
    return jax.tree.map(lambda x: _global_array([jnp.asarray(x)[None]] * n), tree)


def replicate_consuming(params: dict) -> dict:
    """replicate() a nested dict of arrays, popping each array from `params` once it is on the devices.

    An array the caller holds nowhere else is then freed before the next one is copied, so moving
    SD's frozen weights needs one copy of them plus one array, not two copies.
    """
    out = {key: _replicate_popping(params, key) for key in list(params)}
    release_freed_memory()
    return out


def _replicate_popping(params: dict, key: str):
    value = params.pop(key)
    return {k: _replicate_popping(value, k) for k in list(value)} if isinstance(value, dict) else replicate(value)


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps it in its heap otherwise).

    After the weights move to the devices and after XLA compiles the step, SD's run holds about
    0.6 and 1.3 GiB of freed heap that the step's own buffers do not reuse (benchmarks/README.md).
    Nothing to do where the C library is not glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def unreplicate(tree: Any) -> Any:
    """This process's first device copy, fetched to host numpy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data[0]), tree)


def shard(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's [local_batch, ...] arrays -> global [devices, per_device, ...] arrays."""
    n = jax.local_device_count()
    return {k: _global_array(list(v.reshape(n, 1, v.shape[0] // n, *v.shape[1:]))) for k, v in batch.items()}


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable value, on every process."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.resize(data, size)  # same shape everywhere; only process 0's bytes are kept
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def make_update_fn(loss_fn: Callable, optimizer: optax.GradientTransformation, nan_policy: str = "stop") -> Callable:
    """The per-device update(state, frozen, batch) -> (state, metrics), for pmap.

    state = {params, opt_state, step, rng, skipped_steps, nonfinite_step}; a step whose loss,
    gradients or update is not finite keeps the old params (nonfinite.guard). Example i of the global batch gets
    fold_in(fold_in(rng, step), i): per-device streams (axis_index) refined to
    per-example ones, so results do not depend on the device count, and a resumed
    run redraws exactly the noise an uninterrupted one would.
    """

    def update(state, frozen, batch):
        per_device = jax.tree.leaves(batch)[0].shape[0]
        step_key = jax.random.fold_in(state["rng"], state["step"])
        first = jax.lax.axis_index(AXIS) * per_device
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(per_device))
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch, keys)
        loss, grads = jax.lax.pmean((loss, grads), AXIS)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            **state,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        new_state = nonfinite.guard(state, new_state, loss, grads, nan_policy)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   **{name: new_state[name] for name in nonfinite.FIELDS}}
        return new_state, metrics

    return update


def compile_step(update_fn: Callable, state, frozen, batch) -> Callable:
    """AOT-compile the pmapped step (state donated) and log how long that took."""
    start = time.perf_counter()
    step = jax.pmap(update_fn, axis_name=AXIS, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    log.info("compiled the training step in %.1f s", time.perf_counter() - start)
    release_freed_memory()  # the compiler's working memory
    return step
