"""sample.py / apl-sample: a labelled grid of images, with and without a prefix, from one compiled program."""

from __future__ import annotations

import argparse

from PIL import Image

from apl_jax import preflight
from apl_jax.cli import add_sampler_args, enable_compilation_cache, parallel_settings, run_main, sampler_settings
from apl_jax.errors import UserError


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="sample.py", description="Sample images with and without an APL prefix.")
    add_sampler_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt of CFG (default empty)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--prefix", help="a prefix file in any format we export, or a training workdir")
    parser.add_argument("--compare", action="store_true", help="each prompt without and with the prefix, same seeds")
    parser.add_argument("--out", default="grid.png", help="the grid PNG (local or gs://; process 0 writes it)")
    parser.add_argument("--save-dir", help="also save every image here (local or gs://; each process its own)")
    parser.add_argument("--scale", type=preflight.at_least(1, "--scale"), default=None,
                        help="grid upscaling (default: to at least 128 px)")
    args = parser.parse_args(argv)
    if args.compare and not args.prefix:
        raise UserError("--compare needs --prefix")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    out = preflight.image_file(args.out, "--out")  # before any sampling: a bad path must not cost the images
    save_dir = preflight.folder(args.save_dir, "--save-dir") if args.save_dir else None

    import jax

    from apl_jax.config import ParallelConfig
    from apl_jax.export import load_prefix
    from apl_jax.files import atomic_write
    from apl_jax.models import load_model
    from apl_jax.parallel import initialize_distributed
    from apl_jax.sampling import Sampler, SamplerConfig, prompt_grid

    initialize_distributed(ParallelConfig(**parallel_settings(args)))
    enable_compilation_cache()
    prefix = load_prefix(args.prefix) if args.prefix else None
    model = load_model(args.model, args.dtype)
    sampler = Sampler(model, SamplerConfig(**sampler_settings(args)), prefix.vectors if prefix else None,
                      prefix.placeholder if prefix else "alz")
    variants = (False, True) if args.compare else (prefix is not None,)
    grid, labels = prompt_grid(sampler, args.prompt, args.num_images, args.seed, variants, args.negative_prompt,
                               save_dir=save_dir, scale=args.scale)
    if jax.process_index() == 0:  # every process holds the whole grid; one writes it
        atomic_write(out, lambda tmp: grid.save(tmp, format=Image.registered_extensions()[out.suffix.lower()]))
        print(f"wrote {args.out} ({len(labels)} rows x {args.num_images} images)")
    return 0


def main(argv=None) -> None:
    run_main(_main, argv)
