"""train.py / apl-train: train a prefix, then evaluate it where the model has an evaluation.

With no --config it trains on APL-mini, the project's scale model, and evaluates the
prefix there; APL-mini is imported only for its models, so other runs never load it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apl_jax import preflight, storage
from apl_jax.cli import enable_compilation_cache, run_main
from apl_jax.config import PROJECT_DIR, load_config

DEFAULT_CONFIG = PROJECT_DIR / "configs" / "mini.yaml"
APL_MINI_MODELS = ("apl-mini", "apl-mini-ft")  # the models apl_jax.mini has data and an evaluation for


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Train an APL anonymization prefix.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default configs/mini.yaml: APL-mini, then its evaluation)")
    parser.add_argument("--workdir", default=None, help="output folder, local or gs://BUCKET/PATH; rerunning with "
                        "the same one resumes (default runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)

    from apl_jax.trainer import train

    config = load_config(args.config, args.overrides)
    workdir = storage.path(args.workdir or Path("runs") / Path(args.config).stem)
    preflight.folder(workdir, "workdir")  # before APL-mini's data is made, not only before training
    on_mini = config.model.path in APL_MINI_MODELS
    if on_mini:
        from apl_jax.mini.data import with_mini_data

        config = with_mini_data(config)
    enable_compilation_cache()
    result = train(config, workdir)
    if result.interrupted:
        return 143
    if result.prefix_file is None:
        return 0
    print(f"prefix written to {result.prefix_file} (diffusers textual inversion, token <{config.prefix.placeholder}>)")
    if config.eval.after_training:
        if on_mini:
            from apl_jax.mini.evaluate import evaluate_after_training

            evaluate_after_training(config, result.prefix_file, workdir / "eval")
        else:
            print(f"eval.after_training: no built-in evaluation for {config.model.path}; "
                  "run python -m apl_jax.evaluate on the prefix")
    return 0


def main(argv=None) -> None:
    run_main(_main, argv)
