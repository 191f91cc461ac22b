"""Entry points behind train.py and sample.py: argument parsing and one-line user errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from apl_jax.errors import UserError

DEFAULT_CONFIG = "configs/tiny.yaml"


def _enable_compilation_cache() -> None:
    # Recompiling the same step on every run costs tens of seconds; JAX can keep the programs.
    import jax

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "apl_jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _run(main, argv) -> None:
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
    _enable_compilation_cache()
    result = train(config, workdir)
    if result.interrupted:
        return 143
    if result.prefix_file is not None:
        print(f"prefix written to {result.prefix_file} (diffusers textual inversion, token <{config.prefix.placeholder}>)")
    return 0


def train_main(argv=None) -> None:
    _run(_train, argv)
