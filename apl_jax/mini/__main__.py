"""APL-mini: python -m apl_jax.mini build | eval | sweep | splice | data (see each command's --help)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from apl_jax import preflight
from apl_jax.cli import add_sampler_args, enable_compilation_cache, parallel_settings, run_main, sampler_settings
from apl_jax.config import NEUTRAL_MODES, ParallelConfig
from apl_jax.errors import UserError


def _build(args) -> int:
    from apl_jax.mini.build import STAGES, BuildConfig, build

    config = BuildConfig.toy() if args.toy else BuildConfig()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
        if key not in fields:
            raise UserError(f"unknown build setting {key!r}; known: {', '.join(fields)}")
        overrides[key] = type(getattr(config, key))(value)
    config = dataclasses.replace(config, **overrides)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    if unknown := set(stages) - set(STAGES):
        raise UserError(f"unknown stages {sorted(unknown)}; stages are {', '.join(STAGES)}")
    build(args.out, args.work, config, stages)
    return 0


def _eval(args) -> int:
    import jax

    from apl_jax.mini.evaluate import run
    from apl_jax.mini.report import print_report
    from apl_jax.parallel import initialize_distributed
    from apl_jax.sampling import SamplerConfig

    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.batch_size is None:
        args.batch_size = 64  # one device: whole batches, not one image per call
    out = preflight.folder(args.out or Path("runs") / "mini-eval" / f"{args.model}-{Path(args.prefix).stem}", "--out")
    initialize_distributed(ParallelConfig(**parallel_settings(args)))
    report = run(args.model, args.prefix, out, args.num_images, args.seed, SamplerConfig(**sampler_settings(args)),
                 args.neutral_mode)
    if jax.process_index() == 0:
        print_report(report, out)
    return 0


def _numbers(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise UserError(f"{what} must all be positive, got {text!r}")
    return values


def _sweep(args) -> int:
    from apl_jax.mini.sweep import sweep

    probs, steps = _numbers(args.identity_probs, float, "--identity-probs"), _numbers(args.steps, int, "--steps")
    if any(p > 1 for p in probs):
        raise UserError(f"--identity-probs are shares of the training examples, at most 1; got {args.identity_probs!r}")
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    out = preflight.folder(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    sweep(out, probs, steps, args.num_images, args.set)
    print((out / "sweep.md").read_text() + f"wrote {out / 'sweep.png'}, sweep.md and sweep.json")
    return 0


def _splice(args) -> int:
    from apl_jax.mini.splice import run

    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    out = preflight.folder(args.out or Path("runs") / "mini-splice" / f"{args.model}-{Path(args.prefix).stem}", "--out")
    run(args.model, args.prefix, out, args.num_images, args.seed)
    print((out / "splice.md").read_text() + f"wrote {out / 'splice.md'} and splice.json")
    return 0


def _data(args) -> int:
    from apl_jax.mini.data import prepare

    identities, generic = prepare(args.out, args.model, args.seed)
    print(f"identity set: {identities}\ngeneric images: {generic}")
    return 0


def main(argv=None) -> int:
    from apl_jax.mini.metrics import GUIDANCE
    from apl_jax.models import SHIPPED_MODELS

    parser = argparse.ArgumentParser(prog="python -m apl_jax.mini", description=__doc__.split(":")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the APL-mini base model, apl-mini-ft, apl-mini-db and the recognizer")
    build.add_argument("--out", type=Path, default=SHIPPED_MODELS,
                       help=f"where apl-mini, apl-mini-ft, apl-mini-db and apl-mini-recognizer go (default {SHIPPED_MODELS})")
    build.add_argument("--work", type=Path, default=Path.home() / ".cache" / "apl_jax" / "mini-build",
                       help="intermediate results and checkpoints; a rerun resumes from them")
    build.add_argument("--stages", help="comma-separated subset of vae,base,ft,db,recognizer (default all)")
    build.add_argument("--toy", action="store_true", help="a few steps of each stage (a smoke test)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a BuildConfig field")
    evaluate = commands.add_parser("eval", help="ID accuracy/score, face rate and generic fidelity of a prefix, "
                                   f"sampled at CFG {GUIDANCE:g} unless --guidance says otherwise (where apl-mini draws best)")
    add_sampler_args(evaluate)
    evaluate.set_defaults(model="apl-mini", guidance=GUIDANCE)
    evaluate.add_argument("--prefix", required=True, help="a prefix file in any format we export, or a training workdir")
    evaluate.add_argument("--num-images", type=int, default=32, help="per name and prompt kind (default 32)")
    evaluate.add_argument("--out", type=Path, help="report folder (default runs/mini-eval/<model>-<prefix name>)")
    evaluate.add_argument("--neutral-mode", choices=NEUTRAL_MODES, default="empty",
                          help="the data.neutral_mode the prefix was trained with: it decides which targets apply "
                               "(default empty)")
    sweep = commands.add_parser("sweep", help="train and score a grid of identity share x steps on a validation draw, and plot "
                                "ID accuracy against scene accuracy")
    sweep.add_argument("--identity-probs", default="0.65,0.75,0.85",
                       help="shares of identity examples, data.identity_prob (default 0.65,0.75,0.85; configs/mini.yaml's "
                            "0.75, the official 0.5)")
    sweep.add_argument("--steps", default="4000", help="comma-separated training steps; longer runs resume shorter "
                       "ones (default 4000)")
    sweep.add_argument("--num-images", type=int, default=8, help="per name and prompt kind, per point (default 8)")
    sweep.add_argument("--out", type=Path, default=Path("runs") / "mini-sweep",
                       help="one workdir per identity share, reports per point, sweep.png (default runs/mini-sweep); "
                            "a rerun reuses what is there")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of configs/mini.yaml for every point (repeatable)")
    splice = commands.add_parser("splice", help="where a prefix changes scene prompts: its own hidden states, or the "
                                 "caption words' reading (each swapped for an untrained prefix's)")
    splice.add_argument("--prefix", required=True, help="a prefix file in any format we export, or a training workdir")
    splice.add_argument("--model", default="apl-mini")
    splice.add_argument("--num-images", type=int, default=32, help="as eval's: N/8 images per scene (default 32)")
    splice.add_argument("--seed", type=preflight.seed, default=0, help="the sampling noise (default 0)")
    splice.add_argument("--out", type=Path, help="where splice.md and splice.json go (default runs/mini-splice/<model>-<prefix name>)")
    data = commands.add_parser("data", help="make the APL training data (identity set + generic renders)")
    data.add_argument("--model", default="apl-mini")
    data.add_argument("--seed", type=preflight.seed, default=0)
    data.add_argument("--out", type=Path, default=Path("~/.cache/apl_jax/datasets"))
    args = parser.parse_args(argv)
    enable_compilation_cache()
    return {"build": _build, "eval": _eval, "sweep": _sweep, "splice": _splice, "data": _data}[args.command](args)


if __name__ == "__main__":
    run_main(main)
