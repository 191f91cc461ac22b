"""Measure anonymization on APL-mini: the recognizer reads images drawn without and with a prefix.

For every named person, N images of "A close-up portrait of NAME" and N of the
identity-set templates; for scenes, SCENE_PROMPTS prompts x N/4 images; every image
drawn without and with the prefix on the same seeds. Reported:
- ID accuracy (recognizer top-1 = NAME) and ID score (cosine to NAME's reference
  embedding, mean/max per identity as DESIGN.md defines), training vs held-out names;
- face rate of the prefixed identity images;
- trait keep rate: prefixed faces whose hair colour and sex are NAME's (attributes mode);
- generic fidelity: shape+colour accuracy on scene prompts, and Frechet distances in the
  recognizer's embedding space between the plain, prefixed and real scene images.
Each metric is a pure function of recognizer outputs (`score_*`), tested on real renders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import scipy.linalg

from apl_jax.data.prompts import Templates
from apl_jax.face_id import identity_score, summarise, unit
from apl_jax.mini import captions, recognizer, world
from apl_jax.sampling import Sampler, image_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

SCENE_PROMPTS = 24
REFERENCE_RENDERS = 64  # per name, for its reference embedding
EVAL_SEED = 1  # template draws and scenes differ from the training data's (seed 0)
CONDITIONS = ("plain", "prefix")
KEPT_TRAITS = ("hair_colour", "sex")


# ---------------------------------------------------------------- prompts

def identity_prompts(name: str, num_images: int, templates: Templates) -> list[str]:
    """N portrait prompts, then N template prompts (as the identity set was generated, other draws)."""
    portrait = [captions.PORTRAIT_PROMPT.format(name=name)] * num_images
    return portrait + [captions.named_caption(name, k, EVAL_SEED, templates) for k in range(num_images)]


def scene_set(count: int, seed: int = EVAL_SEED) -> list[world.Scene]:
    rng = np.random.default_rng([seed, 5])
    return [world.random_scene(rng) for _ in range(count)]


# ---------------------------------------------------------------- metrics (pure)

def reference_embeddings(params, names: Sequence[str] = world.NAMES, renders: int = REFERENCE_RENDERS) -> np.ndarray:
    """[len(names), EMBEDDING]: the normalised mean embedding of real renders of each name."""
    faces = world.cast()
    images = np.stack([world.render_face(faces[n], [EVAL_SEED, 6, i, k]) for i, n in enumerate(names)
                       for k in range(renders)])
    embeddings = recognizer.classify(params, images)["embedding"].reshape(len(names), renders, -1)
    return np.stack([unit(e.mean(0)) for e in embeddings])


def score_identities(pred: dict[str, np.ndarray], name: str, reference: np.ndarray) -> dict:
    """Recognizer outputs for the images of one name -> accuracy, ID score, face rate, trait keep rate."""
    faces = pred["face"] == 1
    target = world.cast()[name]
    kept = [pred[t][faces] == recognizer.HEADS[t].index(target.visible(t)) for t in KEPT_TRAITS
            if target.visible(t) is not None]
    score = identity_score([e if f else None for e, f in zip(pred["embedding"], faces)], reference)
    return {
        "accuracy": float(np.mean(pred["identity"] == world.NAMES.index(name))),
        "id_score": dataclasses.asdict(score) | {"similarities": None},
        "face_rate": float(np.mean(faces)),
        "trait_keep": float(np.mean(np.all(kept, axis=0))) if faces.any() else 0.0,
    }


def score_scenes(pred: dict[str, np.ndarray], scenes: Sequence[world.Scene]) -> float:
    """Share of images whose shape and colour are their prompt's (scenes[i] for image i)."""
    shape = np.asarray([world.SHAPES.index(s.shape) for s in scenes])
    colour = np.asarray([list(world.COLOURS).index(s.colour) for s in scenes])
    return float(np.mean((pred["face"] == 0) & (pred["shape"] == shape) & (pred["colour"] == colour)))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets (FID's formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(root)))


def group_summary(identities: dict[str, dict], names: Sequence[str], condition: str) -> dict:
    rows = [identities[n][condition] for n in names]
    ids = summarise([_as_score(r["id_score"]) for r in rows])
    return {
        "accuracy": float(np.mean([r["accuracy"] for r in rows])),
        "id_score_mean": ids["mean"], "id_score_max": ids["max"],
        "face_rate": float(np.mean([r["face_rate"] for r in rows])),
        "trait_keep": float(np.mean([r["trait_keep"] for r in rows])),
    }


def _as_score(d: dict):
    from apl_jax.face_id import IdentityScore

    return IdentityScore(d["mean"], d["max"], d["faces"], d["images"], [])


# ---------------------------------------------------------------- the run

def evaluate(sampler: Sampler, params, num_images: int, seed: int = 0, templates: Templates | None = None) -> dict:
    """Every metric of the module docstring, for the sampler's model and prefix."""
    from apl_jax.generate_identities import DEFAULT_TEMPLATES

    templates = templates or Templates.load(DEFAULT_TEMPLATES)
    references = reference_embeddings(params)
    identities, samples = {}, {}
    prompts = [p for name in world.NAMES for p in identity_prompts(name, num_images, templates)]
    per_name = 2 * num_images
    for condition in CONDITIONS:
        images = sampler(prompts, seed=seed, with_prefix=condition == "prefix", progress=True)
        pred = recognizer.classify(params, images)
        for i, name in enumerate(world.NAMES):
            part = {k: v[i * per_name : (i + 1) * per_name] for k, v in pred.items()}
            identities.setdefault(name, {})[condition] = score_identities(part, name, references[i])
        samples[condition] = images

    scenes = scene_set(SCENE_PROMPTS)
    per_scene = max(1, num_images // 4)
    scene_prompts = [s.caption() for s in scenes for _ in range(per_scene)]
    expanded = [s for s in scenes for _ in range(per_scene)]
    real = np.stack([world.render_scene(s, [EVAL_SEED, 7, i]) for i, s in enumerate(expanded)])
    features = {"real": recognizer.classify(params, real)["embedding"]}
    generic = {"real": score_scenes(recognizer.classify(params, real), expanded)}
    for condition in CONDITIONS:
        images = sampler(scene_prompts, seed=seed, with_prefix=condition == "prefix", progress=True)
        pred = recognizer.classify(params, images)
        generic[condition] = score_scenes(pred, expanded)
        features[condition] = pred["embedding"]
        samples["scene_" + condition] = images[::per_scene][:8]
    generic["frechet"] = {
        "plain_vs_prefix": frechet_distance(features["plain"], features["prefix"]),
        "plain_vs_real": frechet_distance(features["plain"], features["real"]),
        "prefix_vs_real": frechet_distance(features["prefix"], features["real"]),
    }
    groups = {"train": world.TRAIN_NAMES, "heldout": world.HELDOUT_NAMES}
    report = {
        "num_images": num_images, "seed": seed,
        "groups": {g: {c: group_summary(identities, names, c) for c in CONDITIONS} for g, names in groups.items()},
        "generic": generic,
        "identities": identities,
    }
    report["targets"] = targets(report)
    return report, samples


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    g, gen = report["groups"], report["generic"]
    out = []

    def add(what, value, bound, met):
        out.append({"target": what, "value": value, "bound": bound, "met": bool(met)})

    for group in ("train", "heldout"):
        add(f"base ID accuracy ({group}) >= 0.80", g[group]["plain"]["accuracy"], 0.8, g[group]["plain"]["accuracy"] >= 0.8)
    divisor = {"train": 10, "heldout": 5}
    for group, d in divisor.items():
        bound = g[group]["plain"]["accuracy"] / d
        add(f"prefix ID accuracy ({group}) <= base/{d}", g[group]["prefix"]["accuracy"], bound,
            g[group]["prefix"]["accuracy"] <= bound)
    face_rate = np.mean([g[x]["prefix"]["face_rate"] for x in g])
    add("face rate with prefix >= 0.90", float(face_rate), 0.9, face_rate >= 0.9)
    bound = 0.95 * gen["plain"]
    add("generic accuracy with prefix >= 0.95 x without", gen["prefix"], bound, gen["prefix"] >= bound)
    keep = np.mean([g[x]["prefix"]["trait_keep"] for x in g])
    add("traits kept with prefix >= 0.80 (attributes mode)", float(keep), 0.8, keep >= 0.8)
    return out


# ---------------------------------------------------------------- outputs

def compare_grid(samples: dict, num_images: int, names: Sequence[str] = world.TRAIN_NAMES[:4] + world.HELDOUT_NAMES[:2],
                 columns: int = 8):
    """Rows: per name (4 training, 2 held-out), its portraits plain then prefixed (same seeds); then scenes."""
    rows, labels = [], []
    for name in names:
        i = world.NAMES.index(name) * 2 * num_images
        for condition in CONDITIONS:
            rows.append(samples[condition][i : i + min(columns, num_images)])
            held_out = " (held out)" if name in world.HELDOUT_NAMES else ""
            labels.append(f"{'[alz] ' if condition == 'prefix' else ''}{name}{held_out}")
    for condition in CONDITIONS:
        rows.append(samples["scene_" + condition][:columns])
        labels.append(f"{'[alz] ' if condition == 'prefix' else ''}scenes")
    return image_grid(rows, labels, scale=3)


def bar_chart(report: dict, path: Path, title: str) -> None:
    g, gen = report["groups"], report["generic"]
    metrics = {
        "ID accuracy\n(train)": (g["train"]["plain"]["accuracy"], g["train"]["prefix"]["accuracy"]),
        "ID accuracy\n(held-out)": (g["heldout"]["plain"]["accuracy"], g["heldout"]["prefix"]["accuracy"]),
        "ID score\n(train, mean)": (g["train"]["plain"]["id_score_mean"], g["train"]["prefix"]["id_score_mean"]),
        "ID score\n(held-out, mean)": (g["heldout"]["plain"]["id_score_mean"], g["heldout"]["prefix"]["id_score_mean"]),
        "face rate": (np.mean([g[x]["plain"]["face_rate"] for x in g]), np.mean([g[x]["prefix"]["face_rate"] for x in g])),
        "traits kept": (np.mean([g[x]["plain"]["trait_keep"] for x in g]),
                        np.mean([g[x]["prefix"]["trait_keep"] for x in g])),
        "generic\naccuracy": (gen["plain"], gen["prefix"]),
    }
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for offset, k, label in ((-0.2, 0, "without prefix"), (0.2, 1, "with prefix")):
        values = [v[k] for v in metrics.values()]
        bars = ax.bar(x + offset, values, 0.4, label=label)
        ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(x, list(metrics), fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(report: dict, settings: dict) -> str:
    g, gen = report["groups"], report["generic"]
    lines = [
        "# APL-mini evaluation", "",
        f"Model `{settings['model']}`, prefix `{settings['prefix']}`; {report['num_images']} portrait + "
        f"{report['num_images']} template images per name and condition, seed {report['seed']}, "
        f"{settings['sampler']}. With and without the prefix share their noise.", "",
        "| names | condition | ID accuracy | ID score mean | ID score max | face rate | traits kept |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group, label in (("train", "training (16)"), ("heldout", "held-out (8)")):
        for condition in CONDITIONS:
            r = g[group][condition]
            lines.append(f"| {label} | {'with' if condition == 'prefix' else 'without'} prefix | {r['accuracy']:.3f} | "
                         f"{r['id_score_mean']:.3f} | {r['id_score_max']:.3f} | {r['face_rate']:.3f} | "
                         f"{r['trait_keep']:.3f} |")
    f = gen["frechet"]
    lines += [
        "", "Generic fidelity (scene prompts; shape and colour both right):", "",
        "| real renders | without prefix | with prefix | Frechet plain-prefix | Frechet plain-real | Frechet prefix-real |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {gen['real']:.3f} | {gen['plain']:.3f} | {gen['prefix']:.3f} | {f['plain_vs_prefix']:.4f} | "
        f"{f['plain_vs_real']:.4f} | {f['prefix_vs_real']:.4f} |",
        "", "Targets:", "", "| target | measured | bound | met |", "| --- | --- | --- | --- |",
        *(f"| {t['target']} | {t['value']:.3f} | {t['bound']:.3f} | {'yes' if t['met'] else 'no'} |"
          for t in report["targets"]),
        "",
    ]
    return "\n".join(lines)


def run(model: str, prefix_path: str, out: Path, num_images: int, seed: int, sampler_config,
        recognizer_params=None) -> dict:
    """Sample, score and write out/report.{md,json}, out/chart.png, out/grid.png; returns the report.

    recognizer_params: None loads the shipped recognizer."""
    from apl_jax.export import load_prefix
    from apl_jax.mini.presets import load_recognizer
    from apl_jax.models import load_model

    prefix = load_prefix(prefix_path)
    sampler = Sampler(load_model(model), sampler_config, prefix.vectors, prefix.placeholder)
    params = load_recognizer() if recognizer_params is None else recognizer_params
    report, samples = evaluate(sampler, params, num_images, seed)
    settings = {"model": model, "prefix": str(prefix_path),
                "sampler": f"{sampler_config.scheduler} {sampler_config.steps} steps, CFG {sampler_config.guidance_scale}"}
    report["settings"] = settings
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report, settings))
    bar_chart(report, out / "chart.png", f"APL-mini: {model}, prefix {Path(prefix_path).name}")
    compare_grid(samples, num_images).save(out / "grid.png")
    return report
