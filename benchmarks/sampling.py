"""Images/s of our sharded sampler against diffusers' PyTorch StableDiffusionPipeline, side by side.

Same model (ours exported with PyTorch weights), resolution, scheduler (DDIM), steps,
guidance and batch, measured in one run so the ratio sees the same machine load.
Without torch it times ours alone and says so.

    python benchmarks/sampling.py [--model tiny-random] [--steps 20] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from apl_jax.models import load_model  # noqa: E402
from apl_jax.sampling import Sampler, SamplerConfig  # noqa: E402
from apl_jax.tokenizer import MAX_LENGTH  # noqa: E402
from flops import lowered_flops, peak_flops  # noqa: E402

PROMPT = "a photo of Ada Quill"


def progress(message: str) -> None:
    """A progress line on stderr: a run cut off by a timeout still shows how far it got."""
    print(f"[sampling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def flops_per_batch(model, args) -> float:
    """One batch's FLOPs by XLA's count of the lowered model calls: `steps` UNet calls on the doubled
    (guided) batch, the VAE decoder, the two text encodings; the same work as diffusers' pipeline.

    Sampler.flops_per_batch counts the compiled program instead, where the denoising loop's body
    counts once and, on GPU, the convolutions and matmuls that became cuDNN/cuBLAS calls not at all
    (at sd15 512 px, batch 4, 20 steps: 0.5 TFLOP on an H200, against 136.2 here).
    """
    def flops(fn, *arguments) -> float:
        return lowered_flops(lambda: jax.jit(fn).lower(*arguments))

    params, latent, doubled = model.params, model.unet.config.sample_size, 2 * args.batch
    ids = jax.ShapeDtypeStruct((doubled, MAX_LENGTH), jnp.int32)
    context = jax.eval_shape(model.encode_text, params["text_encoder"], ids)
    unet = flops(model.predict_noise, params["unet"],
                 jax.ShapeDtypeStruct((doubled, model.unet.config.in_channels, latent, latent), model.dtype),
                 jax.ShapeDtypeStruct((doubled,), jnp.int32), jax.ShapeDtypeStruct(context.shape, model.dtype))
    decode = flops(model.decode, params["vae"],
                   jax.ShapeDtypeStruct((args.batch, model.vae.config.latent_channels, latent, latent), model.dtype))
    return args.steps * unet + decode + flops(model.encode_text, params["text_encoder"], ids)


def time_ours(model, args) -> tuple[float, float, float]:
    sampler = Sampler(model, SamplerConfig(steps=args.steps, guidance_scale=7.0, batch_size=args.batch))
    prompts = [PROMPT] * args.batch
    start = time.perf_counter()
    sampler(prompts, seed=0)  # compiles
    compile_s = time.perf_counter() - start
    progress(f"ours: first call (compiles) {compile_s:.1f} s")
    runs = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        sampler(prompts, seed=seed + 1)
        runs.append(time.perf_counter() - start)
        progress(f"ours: {runs[-1]:.3f} s per batch")
    return args.batch / statistics.median(runs), compile_s, sampler.flops_per_batch()


def time_pytorch(model, args) -> float | None:
    try:
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
    except ImportError:
        return None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder, weights="pt")
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=dtype)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    progress(f"diffusers PyTorch: pipeline saved and loaded in {time.perf_counter() - start:.1f} s on {pipe.device}")
    size = model.unet.config.sample_size * model.vae_scale_factor

    def once(seed):
        generator = torch.Generator(pipe.device).manual_seed(seed)
        with torch.no_grad():
            pipe([PROMPT] * args.batch, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.0,
                 generator=generator, output_type="np")

    once(0)  # warm-up
    runs = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        once(seed + 1)
        runs.append(time.perf_counter() - start)
        progress(f"diffusers PyTorch: {runs[-1]:.3f} s per batch")
    return args.batch / statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_model(args.model, args.dtype)
    progress(f"model {args.model} loaded in {time.perf_counter() - start:.1f} s on {jax.devices()[0].device_kind}")
    ours, compile_s, compiled_flops = time_ours(model, args)
    flops = flops_per_batch(model, args)
    theirs = time_pytorch(model, args)
    device = jax.devices()[0].device_kind
    peak = peak_flops(device)

    def rate(images_per_s: float) -> str:
        achieved = flops * images_per_s / args.batch
        mfu = f", MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
        return f"{achieved / 1e12:.3f} TFLOP/s{mfu}"

    print(f"model={args.model} {args.dtype} DDIM steps={args.steps} batch={args.batch} device={device} x{jax.device_count()}")
    print(f"ours (JAX):         {ours:8.2f} images/s   (compile {compile_s:.1f} s, not included)")
    print(f"work per batch: {flops / 1e9:.1f} GFLOP by XLA's count of the lowered model calls "
          f"(Sampler.flops_per_batch: {compiled_flops / 1e9:.1f}, the compiled program's count)")
    print(f"ours: {rate(ours)}")
    if theirs is None:
        print("diffusers PyTorch:  not measured (torch is not installed)")
    else:
        print(f"diffusers PyTorch:  {theirs:8.2f} images/s, {rate(theirs)}")
        print(f"ratio ours/PyTorch: {ours / theirs:8.2f}x")


if __name__ == "__main__":
    main()
