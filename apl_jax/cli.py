"""Entry points behind train.py and sample.py: argument parsing and one-line user errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from apl_jax import preflight
from apl_jax.errors import UserError

# APL-mini: train, then the compare grid and the evaluation; found from any current folder
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "mini.yaml")


def enable_compilation_cache() -> None:
    # Recompiling the same step on every run costs tens of seconds; JAX can keep the programs.
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "apl_jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_main(main, argv=None) -> None:
    """Run a CLI main(argv) -> exit code; a UserError becomes one 'error:' line and exit 2."""
    # Our own progress at INFO; libraries (orbax narrates every file it renames) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apl_jax").setLevel(logging.INFO)
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # A failed orbax/tensorstore read leaves callbacks that fire into a closed asyncio
        # loop during interpreter shutdown and print a traceback after our one line.
        os._exit(2)
    sys.exit(code or 0)


def _train(argv) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an APL anonymization prefix.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--workdir", default=None, help="output folder; rerunning with the same one resumes "
                        "(default runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)

    from apl_jax.config import load_config
    from apl_jax.trainer import train

    config = load_config(args.config, args.overrides)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    enable_compilation_cache()
    result = train(config, workdir)
    if result.interrupted:
        return 143
    if result.prefix_file is not None:
        print(f"prefix written to {result.prefix_file} (diffusers textual inversion, token <{config.prefix.placeholder}>)")
        if config.eval.mini:
            from apl_jax.mini.evaluate import run
            from apl_jax.mini.__main__ import print_report
            from apl_jax.sampling import SamplerConfig

            report = run(config.model.path, str(result.prefix_file), workdir / "eval", config.eval.num_images,
                         config.train.seed, SamplerConfig(batch_size=64))
            print_report(report, workdir / "eval")
    return 0


def train_main(argv=None) -> None:
    run_main(_train, argv)


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-random", help="a model folder or preset (default tiny-random)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=preflight.seed, default=0)
    parser.add_argument("--scheduler", default="ddim", help="ddim | pndm | dpm++ (default ddim)")
    parser.add_argument("--steps", type=preflight.at_least(1, "--steps"), default=20)
    parser.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--resolution", type=preflight.at_least(8, "--resolution"), default=None,
                        help="pixels (default: the model's)")
    parser.add_argument("--batch-size", type=preflight.at_least(1, "--batch-size"), default=None,
                        help="images per compiled call (default: device count)")


def sampler_config(args):
    from apl_jax.sampling import SamplerConfig

    return SamplerConfig(scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                         resolution=args.resolution, batch_size=args.batch_size)


def _sample(argv) -> int:
    parser = argparse.ArgumentParser(prog="sample.py", description="Sample images with and without an APL prefix.")
    add_sampler_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt of CFG (default empty)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--prefix", help="a prefix file in any format we export, or a training workdir")
    parser.add_argument("--compare", action="store_true", help="each prompt without and with the prefix, same seeds")
    parser.add_argument("--out", default="grid.png", help="the grid PNG")
    parser.add_argument("--save-dir", help="also save every image here")
    parser.add_argument("--scale", type=preflight.at_least(1, "--scale"), default=None,
                        help="grid upscaling (default: to at least 128 px)")
    args = parser.parse_args(argv)
    if args.compare and not args.prefix:
        raise UserError("--compare needs --prefix")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    preflight.image_file(args.out, "--out")
    if args.save_dir:
        preflight.folder(args.save_dir, "--save-dir")

    from apl_jax.export import load_prefix
    from apl_jax.models import load_model
    from apl_jax.sampling import Sampler, prompt_grid

    enable_compilation_cache()
    prefix = load_prefix(args.prefix) if args.prefix else None
    model = load_model(args.model, args.dtype)
    sampler = Sampler(model, sampler_config(args), prefix.vectors if prefix else None,
                      prefix.placeholder if prefix else "alz")
    variants = (False, True) if args.compare else (prefix is not None,)
    grid, labels = prompt_grid(sampler, args.prompt, args.num_images, args.seed, variants, args.negative_prompt,
                               save_dir=Path(args.save_dir) if args.save_dir else None, scale=args.scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(labels)} rows x {args.num_images} images)")
    return 0


def sample_main(argv=None) -> None:
    run_main(_sample, argv)
