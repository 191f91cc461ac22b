"""Command-line plumbing every program shares: one-line user errors, the compilation cache, sampler flags.

A leaf: it imports only the leaves errors and preflight, so any entry point can use it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from apl_jax import preflight
from apl_jax.errors import UserError


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


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-random", help="a model folder, preset or shipped model (default tiny-random)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=preflight.seed, default=0)
    parser.add_argument("--scheduler", default="ddim", help="ddim | pndm | dpm++ (default ddim)")
    parser.add_argument("--steps", type=preflight.at_least(1, "--steps"), default=20)
    parser.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--resolution", type=preflight.at_least(8, "--resolution"), default=None,
                        help="pixels (default: the model's)")
    parser.add_argument("--batch-size", type=preflight.at_least(1, "--batch-size"), default=None,
                        help="images per compiled call (default: device count, all processes together)")
    processes = parser.add_argument_group("multi-process runs (jax.distributed; leave unset on a TPU pod or under "
                                          "SLURM, where JAX finds them, and on one host)")
    processes.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    processes.add_argument("--num-processes", type=preflight.at_least(1, "--num-processes"))
    processes.add_argument("--process-id", type=preflight.at_least(0, "--process-id"))


def sampler_settings(args: argparse.Namespace) -> dict:
    """The sampler flags of add_sampler_args as sampling.SamplerConfig's keyword arguments."""
    return dict(scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                resolution=args.resolution, batch_size=args.batch_size)


def parallel_settings(args: argparse.Namespace) -> dict:
    """The multi-process flags of add_sampler_args as config.ParallelConfig's keyword arguments."""
    return dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                process_id=args.process_id)
