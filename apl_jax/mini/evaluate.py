"""Measure anonymization on APL-mini: the recognizer reads images drawn without and with a prefix.

For every named person, N images of "A close-up portrait of NAME" and N of the
identity-set templates (for apl-mini-db also for the two DreamBooth names), and for a prefix
trained in attributes mode 2N of NAME's description alone (the neutral prompts that mode
trains NAME toward, drawn without the prefix); for scenes, every scene of the world
(world.every_scene, 120) x N/8 images, also behind filler words (no prefix); every image drawn
without and with the prefix on the same seeds. The metrics are in mini/metrics.py,
the written report in mini/report.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from apl_jax.data.prompts import Templates, identity_pair
from apl_jax.mini import captions, recognizer, world
from apl_jax.mini.build import DREAMBOOTH
from apl_jax.mini.metrics import (CONDITIONS, EVAL_SEED, GUIDANCE, frechet_distance, group_summary, reference_embeddings,
                                  scenes_by_word, score_identities, score_scenes, targets)
from apl_jax.mini.report import print_report, write_report
from apl_jax.sampling import Sampler, SamplerConfig

EVAL_SAMPLER = SamplerConfig(batch_size=64, guidance_scale=GUIDANCE)  # DDIM 20 steps, 64 images per call


def identity_prompts(name: str, num_images: int, templates: Templates, draw_seed: int = EVAL_SEED) -> list[str]:
    """N portrait prompts, then N template prompts (as the identity set was generated, other draws)."""
    portrait = [captions.PORTRAIT_PROMPT.format(name=name)] * num_images
    return portrait + [captions.named_caption(name, k, draw_seed, templates) for k in range(num_images)]


def scene_set(seed: int = EVAL_SEED) -> list[world.Scene]:
    """Every scene of the world, in an order of the draw's (the grid shows the first few).

    All of them, not a draw of some: which scenes a prefix loses varies from scene to scene, so a draw of 24
    of the 120 put the with/without ratio anywhere within about ±0.07 (sd) of the whole space's
    (docs/mini/rebuild.md, "The scene target on the whole scene space")."""
    scenes = world.every_scene()
    return [scenes[i] for i in np.random.default_rng([seed, 5]).permutation(len(scenes))]


def images_per_scene(num_images: int) -> int:
    """N/8 images per scene: 120 scenes x 4 at the default 32 images per name and prompt kind."""
    return max(1, num_images // 8)


def scene_images(num_images: int, seed: int = EVAL_SEED) -> list[world.Scene]:
    """The scene each scene image is prompted with: every scene of scene_set(seed), images_per_scene times in a row."""
    return [s for s in scene_set(seed) for _ in range(images_per_scene(num_images))]


def description_prompts(name: str, num_images: int, templates: Templates, draw_seed: int = EVAL_SEED) -> list[str]:
    """2N attributes-mode neutral prompts of NAME, as training pairs them (data/prompts.identity_pair): its
    manifest description inside the identity-set templates, and no name."""
    rng = np.random.default_rng([draw_seed, 11, world.NAMES.index(name)])
    description = world.cast()[name].partial_description()
    return [identity_pair(name, "", rng, templates, "attributes", description)[1] for _ in range(2 * num_images)]


def score_names(sampler: Sampler, params, names, references: np.ndarray, prompts_of, seed: int,
                conditions: tuple[str, ...] = CONDITIONS) -> tuple[dict, dict]:
    """({name: {condition: score_identities(...)}}, {condition: images}) for the prompts_of(name) of `names`
    (references: their reference_embeddings), drawn with the prefix under the condition "prefix" and without
    it under any other."""
    identities, samples = {}, {}
    per_name = [prompts_of(name) for name in names]
    prompts = [p for group in per_name for p in group]
    for condition in conditions:
        images = sampler(prompts, seed=seed, with_prefix=condition == "prefix", progress=True)
        pred = recognizer.classify(params, images)
        start = 0
        for name, reference, group in zip(names, references, per_name):
            part = {k: v[start : start + len(group)] for k, v in pred.items()}
            identities.setdefault(name, {})[condition] = score_identities(part, name, reference)
            start += len(group)
        samples[condition] = images
    return identities, samples


def evaluate(sampler: Sampler, params, num_images: int, seed: int = 0, templates: Templates | None = None,
             draw_seed: int = EVAL_SEED, dreambooth: bool = False, descriptions: bool = False) -> dict:
    """Every metric of the module docstring, for the sampler's model and prefix.

    seed: the sampling noise; draw_seed: the template prompts, scenes and real scene renders;
    dreambooth: also score the DreamBooth names (for apl-mini-db, the one model that knows them);
    descriptions: also score the names' descriptions alone (condition "description", for attributes mode)."""
    from apl_jax.generate_identities import DEFAULT_TEMPLATES

    templates = templates or Templates.load(DEFAULT_TEMPLATES)
    draws = {"num_images": num_images, "templates": templates, "draw_seed": draw_seed}
    references = reference_embeddings(params, world.NAMES)
    identities, samples = score_names(sampler, params, world.NAMES, references,
                                      functools.partial(identity_prompts, **draws), seed)
    if descriptions:
        described, _ = score_names(sampler, params, world.NAMES, references,
                                   functools.partial(description_prompts, **draws), seed, conditions=("description",))
        for name, scores in described.items():
            identities[name] |= scores

    per_scene = images_per_scene(num_images)
    expanded = scene_images(num_images, draw_seed)
    scene_prompts = [s.caption() for s in expanded]
    real = np.stack([world.render_scene(s, [draw_seed, 7, i]) for i, s in enumerate(expanded)])
    features = {"real": recognizer.classify(params, real)["embedding"]}
    generic = {"real": score_scenes(recognizer.classify(params, real), expanded), "by_word": {}}
    for condition in CONDITIONS:
        images = sampler(scene_prompts, seed=seed, with_prefix=condition == "prefix", progress=True)
        pred = recognizer.classify(params, images)
        generic[condition] = score_scenes(pred, expanded)
        generic["by_word"][condition] = scenes_by_word(pred, expanded)
        features[condition] = pred["embedding"]
        samples["scene_" + condition] = images[::per_scene][:8]
    # The same scene prompts behind 1..12 filler words, no prefix: does meaning hang on token positions?
    rng = np.random.default_rng([draw_seed, 10])
    behind_filler = [captions.with_filler(p, rng, share=1.0) for p in scene_prompts]
    generic["filler"] = score_scenes(recognizer.classify(params, sampler(behind_filler, seed=seed, progress=True)),
                                     expanded)
    generic["frechet"] = {
        "plain_vs_prefix": frechet_distance(features["plain"], features["prefix"]),
        "plain_vs_real": frechet_distance(features["plain"], features["real"]),
        "prefix_vs_real": frechet_distance(features["prefix"], features["real"]),
    }
    groups = {"train": world.TRAIN_NAMES, "heldout": world.HELDOUT_NAMES}
    report = {
        "num_images": num_images, "seed": seed,
        "groups": {g: {c: group_summary(identities, names, c) for c in identities[names[0]]}
                   for g, names in groups.items()},
        "generic": generic,
        "identities": identities,
    }
    if dreambooth:
        scores, _ = score_names(sampler, params, world.DREAMBOOTH_NAMES,
                                reference_embeddings(params, world.DREAMBOOTH_NAMES),
                                functools.partial(identity_prompts, **draws), seed)
        report["dreambooth"] = {c: group_summary(scores, world.DREAMBOOTH_NAMES, c) for c in CONDITIONS}
        report["identities"] |= scores
    return report, samples


def run(model: str, prefix_path: str, out: Path, num_images: int, seed: int, sampler_config: SamplerConfig,
        neutral_mode: str = "empty", recognizer_params=None, draw_seed: int = EVAL_SEED) -> dict:
    """Sample, score and write out/report.{md,json}, out/chart.png, out/grid.png; returns the report.

    neutral_mode: the prefix's training mode (data.neutral_mode), which decides the targets that apply.
    draw_seed: the prompt and scene draws (mini.sweep scores on a draw of its own).
    recognizer_params: None loads the shipped recognizer."""
    from apl_jax.export import load_prefix
    from apl_jax.models import load_model

    prefix = load_prefix(prefix_path)
    sampler = Sampler(load_model(model), sampler_config, prefix.vectors, prefix.placeholder)
    params = recognizer.load() if recognizer_params is None else recognizer_params
    dreambooth = Path(str(model)).name == DREAMBOOTH
    report, samples = evaluate(sampler, params, num_images, seed, draw_seed=draw_seed, dreambooth=dreambooth,
                               descriptions=neutral_mode == "attributes")
    report["neutral_mode"] = neutral_mode
    report["targets"] = targets(report, neutral_mode)
    report["settings"] = {"model": model, "prefix": str(prefix_path),
                          "sampler": f"{sampler_config.scheduler} {sampler_config.steps} steps, "
                                     f"CFG {sampler_config.guidance_scale}"}
    if jax.process_index() == 0:  # every process sampled its slice and holds every image; one writes
        write_report(report, samples, out, f"APL-mini: {model}, prefix {Path(prefix_path).name}")
    return report


def evaluate_after_training(config, prefix_file: Path, out: Path) -> None:
    """What train.py runs on a finished APL-mini prefix: the evaluation, printed and written to out."""
    report = run(config.model.path, str(prefix_file), out, config.eval.num_images, config.train.seed,
                 EVAL_SAMPLER, config.data.neutral_mode)
    if jax.process_index() == 0:
        print_report(report, out)
