"""APL-mini's trade-off: a grid of identity share p x training steps, each prefix scored, ID accuracy against scene accuracy.

Runs on a *validation* draw: another training seed (so other identity-set and generic renders),
other sampling seeds and other prompt draws than the evaluation of `python train.py`, so that a
default chosen from the plot is not chosen on the evaluation itself.

p is `data.identity_prob`, the share of training examples that name a person (the rest are generic
captions, which teach the prefix to leave prompts alone). The negative guidance η is not swept: with
the stop-gradient target its only effect on the gradient is a factor (1 + η), which Adam divides
out (tests/test_objective.py), so every η trains the same prefix up to Adam's epsilon.

Each p trains in its own workdir; a longer step count resumes the shorter one's checkpoint (the
trainer's resume is bitwise, so this is the same prefix as a straight run) and each step count's
prefix is kept as prefix-<steps>.safetensors. Under train.lr_schedule=cosine the rate's decay ends
at the step count, so each count trains from the start in a workdir of its own (steps-<count>).
Finished prefixes and their scores are reused, so an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Sequence

import matplotlib

from apl_jax.config import PROJECT_DIR, Config, load_config
from apl_jax.errors import UserError
from apl_jax.mini.data import with_mini_data
from apl_jax.mini.evaluate import EVAL_SAMPLER, run
from apl_jax.trainer import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

DEFAULT_CONFIG = PROJECT_DIR / "configs" / "mini.yaml"
VALIDATION_SEED = 100  # training seed and sampling seed of the validation draw
VALIDATION_DRAW = 2  # prompt and scene draws (the evaluation's are metrics.EVAL_SEED = 1)
DATA_LOCATION = ("identity_dir", "caption_dir", "cache_dir")  # data keys that say where the data is, not what it is


@dataclasses.dataclass(frozen=True)
class Point:
    identity_prob: float
    steps: int
    learning_rate: float
    lr_schedule: str

    @property
    def name(self) -> str:
        return f"p-{self.identity_prob:g}"


def point_score(report: dict, point: Point) -> dict:
    g, generic = report["groups"], report["generic"]
    return {"identity_prob": point.identity_prob, "steps": point.steps, "learning_rate": point.learning_rate,
            "lr_schedule": point.lr_schedule,
            "id_accuracy_train": g["train"]["prefix"]["accuracy"], "id_accuracy_heldout": g["heldout"]["prefix"]["accuracy"],
            "base_id_accuracy_train": g["train"]["plain"]["accuracy"],
            "scene_accuracy": generic["prefix"], "base_scene_accuracy": generic["plain"],
            "face_rate": (g["train"]["prefix"]["face_rate"] + g["heldout"]["prefix"]["face_rate"]) / 2}


def default_point(overrides: Sequence[str]) -> Point | None:
    """configs/mini.yaml's point when the --set values keep its recipe (p and steps are swept, and the data may
    live elsewhere); None otherwise: under another rate, neutral prompt or batch no point is the default."""
    shipped, swept = load_config(DEFAULT_CONFIG), load_config(DEFAULT_CONFIG, list(overrides))
    as_shipped = {k: getattr(shipped.data, k) for k in (*DATA_LOCATION, "identity_prob")}
    swept = dataclasses.replace(swept, data=dataclasses.replace(swept.data, **as_shipped),
                                train=dataclasses.replace(swept.train, steps=shipped.train.steps))
    if swept != shipped:
        return None
    return Point(shipped.data.identity_prob, shipped.train.steps, shipped.train.learning_rate, shipped.train.lr_schedule)


def _train_to(config: Config, point: Point, workdir: Path) -> Path:
    """prefix-<steps>.safetensors of `point`, trained if missing: under a constant rate resumed from a shorter
    run of the same p, under cosine from the start."""
    kept = workdir / f"prefix-{point.steps}.safetensors"
    if not kept.is_file():
        run_dir = workdir if config.train.lr_schedule == "constant" else workdir / f"steps-{point.steps}"
        result = train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=point.steps),
                                           data=dataclasses.replace(config.data, identity_prob=point.identity_prob)),
                       run_dir)
        if result.prefix_file is None:  # stopped by a signal: the checkpoint is saved, nothing to score
            raise KeyboardInterrupt
        shutil.copyfile(result.prefix_file, kept)
    return kept


def sweep(out: Path, identity_probs: Sequence[float], steps: Sequence[int], num_images: int,
          overrides: Sequence[str] = ()) -> list[dict]:
    """Train and score every (p, steps) point under `out`; writes sweep.json, sweep.md and sweep.png, which
    mark the default (default_point) where the grid holds it."""
    config = load_config(DEFAULT_CONFIG, [f"train.seed={VALIDATION_SEED}", "eval.after_training=false", *overrides])
    config = with_mini_data(config)
    _check_same_overrides(out, list(overrides))
    default = default_point(overrides)
    scores = []
    for identity_prob in identity_probs:
        for count in sorted(steps):
            point = Point(identity_prob, count, config.train.learning_rate, config.train.lr_schedule)
            scored = out / point.name / f"eval-{count}" / "report.json"
            if not scored.is_file():
                prefix = _train_to(config, point, out / point.name)
                run(config.model.path, str(prefix), scored.parent, num_images, VALIDATION_SEED,
                    EVAL_SAMPLER, config.data.neutral_mode, draw_seed=VALIDATION_DRAW)
            scores.append(point_score(json.loads(scored.read_text()), point))
    (out / "sweep.json").write_text(json.dumps(scores, indent=1))
    (out / "sweep.md").write_text(table(scores, default))
    plot(scores, default, out / "sweep.png")
    return scores


def _is_default(score: dict, default: Point | None) -> bool:
    return default is not None and (score["identity_prob"], score["steps"], score["learning_rate"],
                                    score["lr_schedule"]) == dataclasses.astuple(default)


def _rate(score: dict) -> str:
    return f"{score['learning_rate']:g}" + ("" if score["lr_schedule"] == "constant" else f" {score['lr_schedule']}")


def _check_same_overrides(out: Path, overrides: list[str]) -> None:
    """Scores and prefixes are reused by path alone, so a folder keeps the --set values it was made with."""
    record = out / "sweep-overrides.json"
    if not record.is_file():
        record.write_text(json.dumps(overrides))
    elif (made_with := json.loads(record.read_text())) != overrides:
        raise UserError(f"{out} holds a sweep made with --set {made_with or 'nothing'}, not {overrides or 'nothing'}: "
                        "its prefixes and scores would be reused as if they matched; choose another --out")


def table(scores: list[dict], default: Point | None) -> str:
    lines = ["| p (identity share) | steps | learning rate | ID accuracy, training names | ID accuracy, held-out | scene accuracy (without: base) | face rate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in scores:
        mark = " (default)" if _is_default(s, default) else ""
        lines.append(f"| {s['identity_prob']:g}{mark} | {s['steps']} | {_rate(s)} | {s['id_accuracy_train']:.3f} (base "
                     f"{s['base_id_accuracy_train']:.3f}) | {s['id_accuracy_heldout']:.3f} | {s['scene_accuracy']:.3f} "
                     f"({s['base_scene_accuracy']:.3f}) | {s['face_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(scores: list[dict], default: Point | None, path: Path) -> None:
    """ID accuracy (training names) against scene accuracy, one point per run; colour = p, label = steps."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    probs = sorted({s["identity_prob"] for s in scores})
    colours = plt.cm.viridis([i / max(1, len(probs) - 1) for i in range(len(probs))])
    for identity_prob, colour in zip(probs, colours):
        row = sorted((s for s in scores if s["identity_prob"] == identity_prob), key=lambda s: s["steps"])
        ax.plot([s["scene_accuracy"] for s in row], [s["id_accuracy_train"] for s in row], "o-", color=colour,
                label=f"p = {identity_prob:g}")
        for s in row:
            ax.annotate(f"{s['steps']}", (s["scene_accuracy"], s["id_accuracy_train"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    chosen = [s for s in scores if _is_default(s, default)]
    if chosen:
        ax.plot(chosen[0]["scene_accuracy"], chosen[0]["id_accuracy_train"], "*", markersize=18, markerfacecolor="none",
                markeredgecolor="red", label=f"default (p = {default.identity_prob:g}, {default.steps} steps)")
    base = scores[0]
    ax.axvline(0.95 * base["base_scene_accuracy"], color="grey", linestyle=":", label="scene target (0.95 × base)")
    ax.axhline(base["base_id_accuracy_train"] / 10, color="grey", linestyle="--", label="ID target (base / 10)")
    ax.set_xlabel("scene accuracy with the prefix (higher: ordinary prompts kept)")
    ax.set_ylabel("ID accuracy with the prefix, training names (lower: anonymized)")
    ax.set_title(f"APL-mini trade-off (validation draw, learning rate {_rate(scores[0])})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
