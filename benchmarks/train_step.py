"""Our pmapped APL step against a PyTorch reference step, side by side, in one invocation.

Both sides load the same weights (our model exported as PyTorch safetensors), train at
the same resolution on the same examples, one example per step as the official code
(--batch N: N examples per step on both sides, to see how busy a larger step keeps a GPU).
Each side runs in its own subprocess, one after the other, so its peak memory is its
own. Reports samples/s (median over timed steps after warm-up), compile time apart,
peak memory, and on GPUs the MFU of our step from XLA's FLOP count.

    python benchmarks/train_step.py --config tiny|sd15@256|sd15@512 [--dtype float32|bfloat16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flops import lowered_flops, peak_flops  # noqa: E402  (benchmarks/ is on the path as the script's folder)

CONFIGS = {  # name: (model preset, resolution)
    "tiny": ("tiny-random", 32),
    "sd15@256": ("sd15-random", 256),
    "sd15@512": ("sd15-random", 512),
}
K, PLACEHOLDER, LR, ETA = 10, 41128, 1e-3, 1.0


def progress(side: str, message: str) -> None:
    """A progress line on stderr, passed through by the parent: a run cut off still shows how far it got."""
    print(f"[{side} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def examples(resolution: int, count: int, batch: int = 1):
    from apl_jax.data.prompts import Templates
    from apl_jax.data.synthetic import SyntheticExamples
    from apl_jax.tokenizer import load_tokenizer

    source = SyntheticExamples(load_tokenizer(), "alz", Templates.load(REPO / "configs/data/templates.yaml"),
                               resolution=resolution, identity_prob=0.5, num_names=4, num_captions=4, seed=0)
    return [source.batch(i, batch) for i in range(count)]


def jax_worker(args) -> dict:
    import dataclasses
    import functools

    import jax
    import numpy as np
    import optax

    from apl_jax import nonfinite, objective, parallel
    from apl_jax.models import load_model

    start = time.perf_counter()
    model = load_model(args.weights, args.dtype)
    if args.remat:
        model = model.with_remat()
    progress("jax", f"model loaded in {time.perf_counter() - start:.1f} s on {jax.local_devices()[0].device_kind}")
    # What apl_jax.trainer.make_optimizer builds for grad_accum_steps=1, without importing
    # apl_jax.trainer: it imports the input pipeline (grain, tensorflow-datasets), which the
    # GPU machines don't have and this benchmark doesn't use.
    optimizer = optax.adam(LR)
    prefix = jax.random.uniform(jax.random.PRNGKey(0), (K, model.text_width))
    state = {"params": prefix, "opt_state": optimizer.init(prefix), "step": 0, "rng": jax.random.PRNGKey(0),
             **nonfinite.initial_fields()}  # the NaN guard's counters, as in the trainer's state
    fused = args.passes == "fused"
    batches = examples(args.resolution, args.warmup + args.steps, args.batch)
    if args.cached_latents:  # what caching the VAE encodings of repeated images would save
        encode = jax.jit(functools.partial(objective.encode_posterior, model))
        for batch in batches:
            mean, std = encode(model.params["vae"], batch.pop("pixels"))
            batch.update(posterior_mean=np.asarray(mean), posterior_std=np.asarray(std))
    # As the trainer does: the frozen weights go to the devices and the host copy is dropped.
    params, model = objective.frozen_inputs(model.params), dataclasses.replace(model, params=None)
    frozen, state = parallel.replicate_consuming(params), parallel.replicate(state)
    loss_fn = functools.partial(objective.apl_loss, model=model, placeholder_id=PLACEHOLDER, negative_guidance=ETA,
                                fused_passes=fused)
    batches = [parallel.shard(b) for b in batches]
    start = time.perf_counter()
    # What parallel.compile_step does
    update = jax.pmap(parallel.make_update_fn(loss_fn, optimizer), axis_name=parallel.AXIS, donate_argnums=(0,))
    step = update.lower(state, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - start
    parallel.release_freed_memory()  # as parallel.compile_step does
    progress("jax", f"step compiled in {compile_s:.1f} s")
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        progress("jax", f"step {i}: {elapsed:.3f} s")
        if i >= args.warmup:
            times.append(elapsed)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    # Bytes accessed from the compiled program (after fusion)
    compiled_cost = (lambda c: (c[0] if isinstance(c, list) else c) or {})(step.cost_analysis())
    # cuDNN's fused attention shows in the compiled program as custom calls (forward and backward)
    fused_attention = step.as_text().count('custom_call_target="__cudnn$fmha')
    return {"side": "jax", "step_s": statistics.median(times), "compile_s": compile_s, "fused": fused,
            "fused_attention_calls": fused_attention,
            "peak_bytes": stats.get("peak_bytes_in_use") or _peak_rss(),
            "flops": lowered_flops(lambda: update.lower(state, frozen, batches[0])),
            "compiled_flops": float(compiled_cost.get("flops", 0)),
            "bytes_accessed": float(compiled_cost.get("bytes accessed", 0)), "device": device.device_kind}


def torch_worker(args) -> dict:
    import torch

    from torch_reference import ReferenceStep

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    start = time.perf_counter()
    step = ReferenceStep(Path(args.weights), K, PLACEHOLDER, LR, ETA, device, dtype)
    progress("torch", f"model loaded in {time.perf_counter() - start:.1f} s on {device}")
    times = []
    for i, batch in enumerate(examples(args.resolution, args.warmup + args.steps, args.batch)):
        pixels = torch.from_numpy(batch["pixels"]).permute(0, 3, 1, 2).to(device, dtype) / 127.5 - 1
        private = torch.from_numpy(batch["private_ids"]).long().to(device)
        neutral = torch.from_numpy(batch["neutral_ids"]).long().to(device)
        start = time.perf_counter()
        step(pixels, private, neutral)  # .item() inside waits for the device
        elapsed = time.perf_counter() - start
        progress("torch", f"step {i}: {elapsed:.3f} s")
        if i >= args.warmup:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"side": "torch", "step_s": statistics.median(times), "compile_s": 0.0, "peak_bytes": peak, "device": name}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def numpy_filled(preset: str):
    """The preset's model with its parameters drawn by NumPy (seed 0) instead of its jitted flax init.

    The same shapes and configs, other values: LeCun-normal kernels, N(0, 0.02) embeddings, zero
    biases, unit norm scales. Speed does not depend on the values, and the init's compile is slow
    on GPU: sd15-random's took 209 s on an H200 (jax 0.11.2), against about 10 s for this.
    """
    import contextlib

    import jax
    import numpy as np

    from apl_jax.models import PRESETS

    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.02
        return (rng.standard_normal(leaf.shape, np.float32) * np.float32(std)).astype(leaf.dtype)

    @contextlib.contextmanager
    def init_by_numpy():  # random_model calls jax.jit once, on its init function: shapes only, then NumPy
        jit = jax.jit
        jax.jit = lambda init: lambda key: jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init, key))
        try:
            yield
        finally:
            jax.jit = jit

    with init_by_numpy():
        return PRESETS[preset]("float32")


def prepare_worker(args) -> dict:
    """Our preset saved once as a diffusers folder with PyTorch weights, shared by both sides."""
    folder = Path(args.weights)
    if not (folder / "model_index.json").exists():
        from apl_jax.models import load_model

        start = time.perf_counter()
        preset = CONFIGS[args.config][0]
        (numpy_filled(preset) if args.numpy_weights else load_model(preset)).save(folder, weights="pt")
        progress("prepare", f"{CONFIGS[args.config][0]} saved to {folder} in {time.perf_counter() - start:.1f} s")
    return {"side": "prepare"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="examples per step, both sides (the official code: 1)")
    parser.add_argument("--passes", default="split", choices=("fused", "split"),
                        help="our step: two UNet calls (split, train.fused_unet_passes' default) or one doubled call (fused)")
    parser.add_argument("--remat", action="store_true", help="our step: recompute the UNet blocks' activations (model.remat)")
    parser.add_argument("--cached-latents", action="store_true",
                        help="our step: VAE encodings precomputed (the reference still encodes every step)")
    parser.add_argument("--numpy-weights", action="store_true",
                        help="with --worker prepare: the preset's shapes filled by NumPy, not its slow-to-compile init")
    parser.add_argument("--skip-reference", action="store_true",
                        help="time our step alone (compare with the PyTorch figure of another run on the same machine)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "apl-jax-bench")
    parser.add_argument("--worker", choices=("prepare", "jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"prepare": prepare_worker, "jax": jax_worker, "torch": torch_worker}[args.worker]
        print("RESULT " + json.dumps(worker(args)))
        return

    # Every side, weight preparation included, runs in its own process: no process holds
    # accelerator memory (JAX preallocates) while another measures.
    weights = args.cache / CONFIGS[args.config][0]
    results = {}
    for side in ("prepare", "jax") if args.skip_reference else ("prepare", "jax", "torch"):
        command = [sys.executable, __file__, "--worker", side, "--weights", str(weights), "--config", args.config,
                   "--resolution", str(CONFIGS[args.config][1]), "--dtype", args.dtype,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--passes", args.passes] + ["--cached-latents"] * args.cached_latents + ["--remat"] * args.remat
        # The worker's stderr (progress lines, warnings, a traceback) passes through as it comes.
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{side}: failed (exit status {done.returncode}; its stderr is above)", flush=True)
            if side == "prepare":
                sys.exit(1)
            continue
        if side != "prepare":
            results[side] = json.loads(lines[-1][len("RESULT "):])
    report(args, results)


def report(args, results: dict) -> None:
    fused = results["jax"]["fused"] if "jax" in results else args.passes == "fused"
    passes = ("one doubled UNet call" if fused else "two UNet calls") + ("" if fused else ", the default")
    cached = ", our VAE encodings cached" if args.cached_latents else ""
    cached += ", our UNet blocks rematerialised" if args.remat else ""
    print(f"config={args.config} dtype={args.dtype} batch={args.batch} per step ({passes}{cached}), median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'side':8} {'device':24} {'samples/s':>10} {'step s':>9} {'compile s':>10} {'peak MiB':>9}")
    for side, r in results.items():
        print(f"{side:8} {r['device'][:24]:24} {args.batch / r['step_s']:10.3f} {r['step_s']:9.3f} {r['compile_s']:10.1f} "
              f"{r['peak_bytes'] / 2**20:9.0f}")
    if len(results) == 2:
        print(f"ratio ours/PyTorch: {results['torch']['step_s'] / results['jax']['step_s']:.2f}x")
    ours = results.get("jax")
    if ours and ours["flops"]:
        achieved = ours["flops"] / ours["step_s"]
        peak = peak_flops(ours["device"])
        mfu = f", MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
        traffic = ours.get("bytes_accessed", 0)
        intensity = f", {traffic / 1e9:.1f} GB accessed ({ours['flops'] / traffic:.0f} FLOP/byte)" if traffic else ""
        print(f"our step: {ours['flops'] / 1e9:.1f} GFLOP (XLA cost analysis) of the lowered program "
              f"({ours['compiled_flops'] / 1e9:.1f} counted in the compiled one){intensity}, "
              f"{achieved / 1e12:.3f} TFLOP/s{mfu}; cuDNN fused-attention calls in the compiled step: "
              f"{ours['fused_attention_calls']}")


if __name__ == "__main__":
    main()
