"""Evaluate a prefix: ID score and CLIP score, without and with it, on the same seeds.

    python -m apl_jax.evaluate --model M --prefix FILE --names FILE --references DIR --out DIR
        [--clip-model DIR] [--prompts FILE] [--num-images 8] [--embedder dlib|arcface:PATH.onnx|fake] [--reuse]

For each NAME, --num-images images of "A close-up portrait of NAME" (the official
evaluation prompt), and of each generic prompt in --prompts, plain and with the
prefix. DIR receives report.md, report.json, id_scores.png (per identity),
grids/*.png (plain rows above prefixed ones) and images/<group>/<condition>/*.png
with images/<group>/manifest.json; --reuse keeps images whose manifest matches.
DIR may be gs://. In N processes each process writes the images its devices drew;
process 0 writes the manifests (after a barrier), grids and report. Every process
scores every image, so that all of them finish together.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import matplotlib
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from apl_jax import parallel, preflight, storage
from apl_jax.cli import add_sampler_args, enable_compilation_cache, parallel_settings, run_main, sampler_settings
from apl_jax.config import ParallelConfig
from apl_jax.errors import UserError
from apl_jax.export import load_prefix
from apl_jax.files import atomic_write
from apl_jax.face_id import (
    FaceEmbedder, IdentityScore, identity_score, make_embedder, reference_embedding, reference_photos, summarise,
)
from apl_jax.generate_identities import read_lines, read_names
from apl_jax.sampling import Sampler, SamplerConfig, image_grid, save_images

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

IDENTITY_PROMPT = "A close-up portrait of {}"  # the official test_id.py prompt
CONDITIONS = {"plain": False, "prefix": True}  # report key -> Sampler's with_prefix
GRID_PROMPTS = 8  # prompts per grid page (two rows each)
GRID_COLUMNS = 8
GRID_TILE = 128  # pixels per grid image, so pages of 512 px and of 32 px images look alike


# ---------------------------------------------------------------- images

def load_or_sample(make_sampler: Callable[[], Sampler], folder, prompts: Sequence[str], num_images: int,
                   seed: int, settings: dict, reuse: bool) -> dict[str, np.ndarray]:
    """{condition: uint8 [len(prompts) * num_images, H, W, 3]}; prompt i owns images i*n..(i+1)*n-1."""
    expanded = [p for p in prompts for _ in range(num_images)]
    wanted = {"settings": settings, "prompts": expanded}
    manifest_path = folder / "manifest.json"
    if reuse and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        files = {c: [folder / f for f in manifest["files"][c]] for c in CONDITIONS}
        if {k: manifest[k] for k in wanted} == wanted and all(p.is_file() for paths in files.values() for p in paths):
            print(f"reusing the images in {folder}", file=sys.stderr)
            return {c: np.stack([_read_image(p) for p in paths]) for c, paths in files.items()}
        print(f"--reuse: the images in {folder} were made for other prompts or settings; sampling anew", file=sys.stderr)
    sampler = make_sampler()
    images, files = {}, {}
    for condition, with_prefix in CONDITIONS.items():
        print(f"sampling {len(expanded)} images ({folder.name}, {condition})", file=sys.stderr)
        # Default noise indices 0..n-1 for both conditions: image j of each shares its seed.
        images[condition] = sampler(expanded, seed=seed, with_prefix=with_prefix, progress=True)
        if jax.process_index() == 0:  # no stale images from an earlier, larger run
            _remove_tree(folder / condition)
        _all_processes_here(f"{folder} cleared")
        paths = save_images(folder / condition, images[condition], expanded, condition, sampler.owned(len(expanded)))
        files[condition] = [f"{condition}/{p.name}" for p in paths]
    _all_processes_here(f"{folder} written")  # the manifest only once every image is on storage
    if jax.process_index() == 0:
        manifest = json.dumps({**wanted, "files": files}, indent=1)
        atomic_write(manifest_path, lambda tmp: tmp.write_text(manifest))
    return images


def _read_image(path) -> np.ndarray:
    with path.open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _remove_tree(folder) -> None:
    if storage.is_remote(folder):
        if folder.exists():
            folder.rmtree()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _all_processes_here(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"apl_jax evaluate: {what}")


def save_grids(images: dict[str, np.ndarray], prompts: Sequence[str], num_images: int, placeholder: str,
               out, group: str) -> list:
    """Pages of GRID_PROMPTS prompts: each a plain row above a prefixed row, same seeds per column."""
    resolution = images["plain"].shape[1]
    scale = max(1, GRID_TILE // resolution)
    columns = min(num_images, GRID_COLUMNS)

    def tiles(batch):
        if resolution <= GRID_TILE:
            return batch
        return np.stack([np.asarray(Image.fromarray(i).resize((GRID_TILE, GRID_TILE), Image.LANCZOS)) for i in batch])

    pages = []
    for page, first in enumerate(range(0, len(prompts), GRID_PROMPTS)):
        rows, labels = [], []
        for i, prompt in enumerate(prompts[first : first + GRID_PROMPTS], start=first):
            for condition, with_prefix in CONDITIONS.items():
                rows.append(tiles(images[condition][i * num_images : i * num_images + columns]))
                labels.append(f"[{placeholder}] {prompt}" if with_prefix else prompt)
        path = out / "grids" / f"{group}-{page:02d}.png"
        grid = image_grid(rows, labels, [f"#{k}" for k in range(columns)], scale=scale)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        pages.append(path)
    return pages


# ---------------------------------------------------------------- scores

def embed_all(embedder: FaceEmbedder, images: dict[str, np.ndarray]) -> dict[str, list]:
    total = sum(len(batch) for batch in images.values())
    with tqdm(total=total, desc=f"face embeddings ({embedder.name})", unit="img") as bar:
        out = {}
        for condition, batch in images.items():
            out[condition] = []
            for image in batch:
                out[condition].append(embedder.embed(image))
                bar.update()
    return out


def id_scores(embeddings: dict[str, list], references: dict, names: Sequence[str],
              num_images: int) -> dict[str, list[IdentityScore]]:
    return {
        condition: [identity_score(found[i * num_images : (i + 1) * num_images], references[name].embedding)
                    for i, name in enumerate(names)]
        for condition, found in embeddings.items()
    }


def clip_means(scorer, images: dict[str, np.ndarray], prompts: Sequence[str], num_images: int) -> dict:
    """Mean CLIP score per condition and per prompt, always against the prompt as written (no placeholder)."""
    expanded = [p for p in prompts for _ in range(num_images)]
    per_image = {c: scorer.scores(batch, expanded) for c, batch in images.items()}
    return {
        **{c: float(s.mean()) for c, s in per_image.items()},
        "prompts": {p: {c: float(s[i * num_images : (i + 1) * num_images].mean()) for c, s in per_image.items()}
                    for i, p in enumerate(prompts)},
    }


# ---------------------------------------------------------------- report

def plot_id_scores(report: dict, path):
    identities = report["id_score"]["identities"]
    names = list(identities)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    for offset, (condition, label) in zip((-0.2, 0.2), (("plain", "without prefix"), ("prefix", "with prefix"))):
        ax.bar(x + offset, [identities[n][condition]["mean"] for n in names], 0.4, label=f"{label} (mean)")
        ax.scatter(x + offset, [identities[n][condition]["max"] for n in names], marker="_", s=120, color="black",
                   zorder=3, label="max" if condition == "prefix" else None)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel(f"ID score (cosine, {report['id_score']['embedder']})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))  # outside: never over a bar
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def _id_cell(score: dict) -> str:
    return f"{score['mean']:.3f} / {score['max']:.3f} ({score['faces']}/{score['images']})"


def markdown(report: dict) -> str:
    s, ids, clip = report["settings"], report["id_score"], report["clip_score"]
    sampler = s["sampler"]
    lines = [
        "# APL evaluation", "",
        f"Model `{s['model']}`, prefix `{s['prefix']}` (placeholder `{s['placeholder']}`, {s['prefix_shape'][0]} x "
        f"{s['prefix_shape'][1]}); {s['num_images']} images per prompt, seed {s['seed']}, {sampler['scheduler']} "
        f"{sampler['steps']} steps, CFG {sampler['guidance_scale']}. Each image with the prefix shares its noise "
        "with the image without it.", "",
        f"## ID score ({ids['embedder']})", "",
        f"Cosine between the face in each image of \"{IDENTITY_PROMPT.format('NAME')}\" and NAME's reference "
        "embedding (the normalised mean over the reference photos); per identity the mean and the max over the "
        "images with a face (0 when none has one), averaged over identities. Lower with the prefix = anonymized.", "",
        "| | without prefix | with prefix |", "| --- | --- | --- |",
        *(f"| {label} | {ids['plain'][key]:.3f} | {ids['prefix'][key]:.3f} |"
          for key, label in (("mean", "mean ID score"), ("max", "max ID score"), ("detection_rate", "face detection rate"))),
        "", "Per identity: mean / max (images with a face / images).", "",
        "| identity | reference photos (faces) | without prefix | with prefix |", "| --- | --- | --- | --- |",
        *(f"| {name} | {v['reference_photos']} ({v['reference_faces']}) | {_id_cell(v['plain'])} | {_id_cell(v['prefix'])} |"
          for name, v in ids["identities"].items()),
        "", "![ID score per identity](id_scores.png)", "",
    ]
    if clip is not None:
        lines += [
            f"## CLIP score (`{s['clip_model']}`)", "",
            "100 x cosine between CLIP's image embedding and the embedding of the prompt as written: never the "
            "placeholder, also for the images made with the prefix.", "",
            "| prompts | without prefix | with prefix |", "| --- | --- | --- |",
            *(f"| {group} | {clip[group]['plain']:.2f} | {clip[group]['prefix']:.2f} |"
              for group in ("identity", "generic") if clip[group] is not None),
            "",
        ]
    lines += ["## Grids", "", *(f"- [{g}]({g})" for g in report["grids"]), ""]
    return "\n".join(lines)


def prefix_digest(vectors: np.ndarray) -> str:
    # Part of the images' manifest: a retrained prefix under the same file name must not reuse old images.
    return hashlib.sha256(np.ascontiguousarray(vectors, np.float32).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apl_jax.evaluate", description=__doc__.split("\n\n")[0])
    add_sampler_args(parser)
    parser.add_argument("--prefix", required=True, help="a prefix file in any format we export, or a training workdir")
    parser.add_argument("--names", required=True, type=Path, help="text file, one NAME per line")
    parser.add_argument("--references", required=True, type=Path, help="folder with one subfolder of photos per NAME")
    parser.add_argument("--prompts", type=Path, help="text file of generic prompts (one per line) for the CLIP score")
    parser.add_argument("--clip-model", type=Path, help="a transformers CLIP folder (e.g. openai/clip-vit-large-patch14)")
    parser.add_argument("--embedder", default="dlib", help="dlib (default) | arcface:PATH.onnx | fake (tests only)")
    parser.add_argument("--num-images", type=int, default=8, help="images per prompt and condition (default 8)")
    parser.add_argument("--out", required=True, help="report folder, local or gs://")
    parser.add_argument("--reuse", action="store_true", help="keep images already sampled with the same settings")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")

    # Every input and the output folder are checked before the long work starts.
    out = preflight.folder(args.out, "--out")
    names = read_names(args.names)
    generic = read_lines(args.prompts, "prompts") if args.prompts else []
    if not args.references.is_dir():
        raise UserError(f"references folder {args.references} does not exist")
    photos = {name: reference_photos(args.references, name) for name in names}
    prefix = load_prefix(args.prefix)
    embedder = make_embedder(args.embedder)
    if args.clip_model is not None and not args.clip_model.is_dir():
        raise UserError(f"CLIP model folder {args.clip_model} does not exist")
    with tqdm(names, desc="reference embeddings", unit="name") as bar:  # closed (a newline) before any error line
        references = {name: reference_embedding(embedder, photos[name], name) for name in bar}

    parallel.initialize_distributed(ParallelConfig(**parallel_settings(args)))
    enable_compilation_cache()
    config = SamplerConfig(**sampler_settings(args))
    settings = {"model": str(args.model), "dtype": args.dtype, "prefix": str(args.prefix),
                "prefix_digest": prefix_digest(prefix.vectors), "placeholder": prefix.placeholder,
                "seed": args.seed, "sampler": dataclasses.asdict(config)}

    @functools.cache  # the model is loaded only when some images must be sampled
    def make_sampler() -> Sampler:
        from apl_jax.models import load_model

        return Sampler(load_model(args.model, args.dtype), config, prefix.vectors, prefix.placeholder)

    identity_prompts = [IDENTITY_PROMPT.format(name) for name in names]
    groups = {"identity": identity_prompts, **({"generic": generic} if generic else {})}
    images = {group: load_or_sample(make_sampler, out / "images" / group, prompts, args.num_images, args.seed,
                                    settings, args.reuse)
              for group, prompts in groups.items()}

    # Every process holds every image and scores them all, though only process 0 writes: a process that
    # finished early would wait for the others in JAX's shutdown barrier, which gives up after 5 minutes
    # (less than the face embeddings of a real evaluation take) and then aborts every process.
    scores = id_scores(embed_all(embedder, images["identity"]), references, names, args.num_images)
    clip = None
    if args.clip_model is not None:
        from apl_jax.clip_score import SCALE, ClipScorer

        scorer = ClipScorer(args.clip_model)
        print("CLIP scores", file=sys.stderr)
        clip = {"scale": SCALE, "generic": None,
                **{group: clip_means(scorer, images[group], prompts, args.num_images) for group, prompts in groups.items()}}
    if jax.process_index() != 0:
        return 0

    grids = [f"grids/{path.name}" for group, prompts in groups.items()
             for path in save_grids(images[group], prompts, args.num_images, prefix.placeholder, out, group)]
    report = {
        "settings": {**settings, "prefix_shape": list(prefix.vectors.shape), "names": str(args.names),
                     "references": str(args.references), "prompts": str(args.prompts) if args.prompts else None,
                     "clip_model": str(args.clip_model) if args.clip_model else None, "num_images": args.num_images,
                     "identity_prompt": IDENTITY_PROMPT.format("NAME")},
        "id_score": {
            "embedder": embedder.name,
            **{condition: summarise(s) for condition, s in scores.items()},
            "identities": {
                name: {"reference_photos": references[name].photos, "reference_faces": references[name].faces,
                       **{condition: dataclasses.asdict(s[i]) for condition, s in scores.items()}}
                for i, name in enumerate(names)
            },
        },
        "clip_score": clip,
        "grids": grids,
    }
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    plot_id_scores(report, out / "id_scores.png")
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(markdown(report)))
    ids = report["id_score"]
    print(f"ID score mean {ids['plain']['mean']:.3f} -> {ids['prefix']['mean']:.3f} with the prefix "
          f"(max {ids['plain']['max']:.3f} -> {ids['prefix']['max']:.3f}; faces found "
          f"{ids['plain']['detection_rate']:.0%} -> {ids['prefix']['detection_rate']:.0%})")
    if clip is not None:
        print(f"CLIP score (identity prompts, x{SCALE}) {clip['identity']['plain']:.2f} -> {clip['identity']['prefix']:.2f}")
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
