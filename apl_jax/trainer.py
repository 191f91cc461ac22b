"""The APL training loop: config -> model + data -> pmapped step -> checkpoints -> prefix file."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import time

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from apl_jax import nonfinite, objective, parallel, preflight, storage
from apl_jax.checkpoint import Checkpointer
from apl_jax.config import Config, TrainConfig
from apl_jax.data.prompts import Templates
from apl_jax.data import HostInput
from apl_jax.data.pipeline import StreamInput, folder_input
from apl_jax.data.synthetic import SyntheticExamples
from apl_jax.errors import UserError
from apl_jax.export import save_diffusers_prefix
from apl_jax.latent_cache import LatentCache
from apl_jax.metrics import MetricsLog
from apl_jax.models import FrozenSD, load_model
from apl_jax.prefix import init_prefix, single_token_id
from apl_jax.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int  # the step training stopped at
    interrupted: bool  # stopped by SIGTERM/SIGINT (checkpoint saved, no prefix export)
    prefix_file: storage.AnyPath | None  # DIR/prefix.safetensors of a finished run (process 0 wrote it)


def learning_rate(config: TrainConfig) -> optax.ScalarOrSchedule:
    """config.learning_rate, or a schedule of the optimizer's update count (one per grad_accum_steps steps)."""
    if config.lr_schedule == "constant":
        return config.learning_rate
    return optax.cosine_decay_schedule(config.learning_rate, max(1, config.steps // config.grad_accum_steps))


def learning_rate_at(config: TrainConfig, step: int) -> float:
    """The rate of the update made by step `step` (1-based); under MultiSteps, of the update it accumulates into."""
    rate = learning_rate(config)
    return float(rate((step - 1) // config.grad_accum_steps) if callable(rate) else rate)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    optimizer = optax.adam(learning_rate(config))
    if config.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum_steps)
    return optimizer


def make_input(config: Config, model: FrozenSD) -> HostInput:
    """This host's batch stream for config.data."""
    data = config.data
    if data.resolution % model.vae_scale_factor:
        raise UserError(f"data.resolution={data.resolution} is not divisible by the VAE factor {model.vae_scale_factor}")
    host_range = parallel.host_example_range(config.train.batch_size)
    if data.source == "folders":
        return folder_input(data, model.tokenizer, config.prefix.placeholder, config.train.seed,
                            config.train.batch_size, *host_range, num_vectors=config.prefix.num_vectors)
    if data.source != "synthetic":
        raise UserError(f"data.source must be 'synthetic' or 'folders', got {data.source!r}")
    if data.identity_dir or data.caption_dir or data.neutral_mode != "empty" or data.private_templates:
        # Don't let a forgotten data.source=folders train on synthetic data.
        raise UserError("data.identity_dir, data.caption_dir, data.neutral_mode and data.private_templates only apply "
                        "to data.source=folders; add --set data.source=folders")
    examples = SyntheticExamples(
        model.tokenizer, config.prefix.placeholder, Templates.load(data.templates),
        num_vectors=config.prefix.num_vectors, resolution=data.resolution, identity_prob=data.identity_prob,
        num_names=data.synthetic_names, num_captions=data.synthetic_captions, seed=config.train.seed,
    )
    return StreamInput(examples, config.train.batch_size, *host_range, threads=data.loader_threads)


class CachedLatentsInput:
    """A HostInput whose batches carry cached VAE posteriors instead of pixels."""

    def __init__(self, host_input: HostInput, model: FrozenSD, replicated_vae):
        """`replicated_vae`: the VAE params as the step gets them; the first local device's copy encodes."""
        encode = jax.jit(functools.partial(objective.encode_posterior, model))
        vae_params = jax.tree.map(lambda x: x.addressable_shards[0].data[0], replicated_vae)
        self.host_input = host_input
        self.cache = LatentCache(lambda pixels: jax.device_get(encode(vae_params, pixels)))

    def next_batch(self) -> dict[str, np.ndarray]:
        return self.cache(self.host_input.next_batch())

    def get_state(self) -> dict:
        return self.host_input.get_state()

    def set_state(self, state: dict) -> None:
        self.host_input.set_state(state)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so it can save first."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signum

    def requested(self) -> bool:
        stop = self.received is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            stop = bool(multihost_utils.process_allgather(np.int32(stop)).any())
        return stop

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def initial_state(config: Config, model: FrozenSD, optimizer) -> dict:
    rng = jax.random.PRNGKey(config.train.seed)
    prefix = init_prefix(model, config.prefix.num_vectors, jax.random.fold_in(rng, 1), config.prefix.init_word)
    state = {"params": prefix, "opt_state": optimizer.init(prefix), "step": np.int32(0), "rng": rng,
             **nonfinite.initial_fields()}
    return jax.device_get(state)


def _claim_workdir(workdir: storage.AnyPath, stack: contextlib.ExitStack) -> None:
    """Process 0 checks the workdir and locks it, before any model loads; the others learn of a failure.

    A gs:// workdir has no lock: GCS has no exclusive create through epath, and a lock
    left by a preempted host (a VM that comes back as a new machine) could never be
    checked, so it would block the resume that preemption needs."""
    failure = None
    if jax.process_index() == 0:
        try:
            preflight.folder(workdir, "workdir")
            workdir.mkdir(parents=True, exist_ok=True)
            if not storage.is_remote(workdir):
                stack.enter_context(WorkdirLock(workdir))
        except UserError as err:
            failure = str(err)
    if jax.process_count() > 1:  # the other hosts would otherwise wait for process 0 forever
        failure = parallel.broadcast_json(failure)
    if failure is not None:
        raise UserError(failure)


def train(config: Config, workdir) -> TrainResult:
    """Train into `workdir` (local, or gs:// on a pod); every process must see the same workdir."""
    parallel.initialize_distributed(config.parallel)
    workdir = storage.path(workdir)
    parallel.per_device_batch(config.train.batch_size)  # refuse a bad batch size before loading anything

    with contextlib.ExitStack() as stack:
        _claim_workdir(workdir, stack)
        model = load_model(config.model.path, config.model.dtype)
        if config.model.remat:
            model = model.with_remat()
        placeholder_id = single_token_id(model, config.prefix.placeholder)
        host_input = make_input(config, model)
        optimizer = make_optimizer(config.train)
        state = initial_state(config, model, optimizer)
        # the caption drift term's reference: the same on a resume, since the initialisation is seeded
        start_prefix = state["params"] if config.train.caption_drift_weight else None

        # Every process saves and restores (orbax coordinates them), so all read the same state.
        checkpointer = stack.enter_context(
            Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints, config.to_dict())
        )
        restored = checkpointer.restore(state)
        if restored is not None:
            state, data_state = restored
            host_input.set_state(data_state)
        # Modules only from here on; the arrays reach the step as arguments. The host copy of the frozen
        # weights is freed array by array as it reaches the devices (two copies of SD would double the memory).
        params, model = objective.frozen_inputs(model.params, start_prefix), dataclasses.replace(model, params=None)
        frozen = parallel.replicate_consuming(params)
        return _train_from(config, workdir, model, frozen, placeholder_id, host_input, optimizer, state, checkpointer)


def _train_from(config, workdir, model, frozen, placeholder_id, host_input, optimizer, state,
                checkpointer) -> TrainResult:
    is_main = jax.process_index() == 0  # the one writer of metrics and the prefix file
    start_step = int(state["step"])
    if start_step:
        log.info("resumed from step %d", start_step)

    loss_fn = functools.partial(
        objective.apl_loss,
        model=model,
        placeholder_id=placeholder_id,
        negative_guidance=config.train.negative_guidance,
        caption_drift_weight=config.train.caption_drift_weight,
        fused_passes=config.train.fused_unet_passes,
    )
    update_fn = parallel.make_update_fn(loss_fn, optimizer, config.train.nan_policy)
    device_state = parallel.replicate(state)

    metrics_log = MetricsLog(workdir, start_step) if is_main else None
    interrupted = False
    if config.train.cache_latents:
        host_input = CachedLatentsInput(host_input, model, frozen["vae"])
    if start_step < config.train.steps:
        first_batch = parallel.shard(host_input.next_batch())
        step_fn = parallel.compile_step(update_fn, device_state, frozen, first_batch)
        device_state, interrupted = _loop(config, step_fn, device_state, frozen, first_batch, host_input, checkpointer,
                                          metrics_log)
        state = parallel.unreplicate(device_state)
    result = TrainResult(step=int(state["step"]), interrupted=interrupted, prefix_file=None)
    if is_main:
        if not interrupted:
            nonfinite.require_finite(state["params"], "the trained prefix")
            result.prefix_file = save_diffusers_prefix(workdir / "prefix.safetensors", state["params"], config.prefix.placeholder)
        if metrics_log.records:
            metrics_log.plot()
        metrics_log.close()
    if not interrupted and jax.process_count() > 1:
        # Every process may go on to sample with the prefix (the evaluation), once process 0 has written it.
        multihost_utils.sync_global_devices("apl_jax prefix written")
        result.prefix_file = workdir / "prefix.safetensors"
    return result


def _loop(config, step_fn, device_state, frozen, batch, host_input, checkpointer, metrics_log):
    """Run steps until train.steps or a stop signal; returns (device state, interrupted)."""
    is_main = jax.process_index() == 0
    step = int(parallel.unreplicate(device_state["step"]))
    stop = StopSignal()
    interrupted = False
    bar = tqdm(total=config.train.steps, initial=step, desc="APL", unit="step", disable=not is_main, dynamic_ncols=True)
    tic, tic_step = time.perf_counter(), step
    skipped_at_start, warned = int(parallel.unreplicate(device_state["skipped_steps"])), False
    try:
        while step < config.train.steps and not interrupted:
            device_state, metrics = step_fn(device_state, frozen, batch)
            step += 1
            data_state = host_input.get_state()  # the position after this step's batch
            if step < config.train.steps:
                batch = parallel.shard(host_input.next_batch())  # prepared while the step runs
            bar.update(1)
            interrupted = stop.requested()
            log_now = step % config.train.log_every == 0 or step == config.train.steps
            save_now = interrupted or step % config.train.checkpoint_every == 0 or step == config.train.steps
            if not (log_now or save_now):
                continue
            values = parallel.unreplicate(metrics)  # the only host sync: logged and checkpointed steps
            if is_main and log_now:
                loss = float(values["loss"])
                rate = (step - tic_step) / (time.perf_counter() - tic)
                tic, tic_step = time.perf_counter(), step
                metrics_log.log({"step": step, "loss": loss, "grad_norm": float(values["grad_norm"]), "steps_per_s": rate,
                                 "learning_rate": learning_rate_at(config.train, step),
                                 "skipped_steps": int(values["skipped_steps"])})
                bar.set_postfix(loss=f"{loss:.4g}", steps_s=f"{rate:.2f}")
            # Every process sees the same values (they are device-averaged), so all stop at the same step.
            nonfinite.check_stop(values)
            if not warned and values["skipped_steps"] > skipped_at_start:
                log.warning("step %d: a NaN/Inf loss or gradient; such steps are skipped (train.nan_policy=skip) and "
                            "counted as skipped_steps in metrics.jsonl", step)
                warned = True  # once per run; metrics.jsonl has the count
            if save_now:
                saved = checkpointer.save(parallel.unreplicate(device_state), data_state)
        if interrupted:
            tqdm.write(f"stopped by signal at step {step}; checkpoint saved in {saved}. Rerun the same command to resume.")
    finally:
        bar.close()
        stop.restore()
    return device_state, interrupted
