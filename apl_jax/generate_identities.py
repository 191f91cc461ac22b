"""Render an identity set with the base model, as the official dataset_generation.py does.

    python -m apl_jax.generate_identities --model M --names FILE --per-name 100 --out DIR

Prompt k of NAME is "[PRE] NAME [TEMPLATE]", each part drawn with probability 1/2
from configs/data/templates.yaml (seeded by NAME's position and k). Images are
written as DIR/<Name>-<k>.png with DIR/manifest.json, the layout the identity_faces
builder reads. A rerun skips every image already on disk, so an interrupted run
resumes where it stopped and finished names are never redone.

DIR may be gs://. In N processes (a TPU pod, or --num-processes) every batch is split
over all processes' devices; each process writes the images its devices drew, and
process 0 writes manifest.json once all images are on storage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from apl_jax import parallel, preflight, storage
from apl_jax.cli import add_sampler_args, enable_compilation_cache, parallel_settings, run_main, sampler_settings
from apl_jax.config import DEFAULT_TEMPLATES, ParallelConfig
from apl_jax.errors import UserError
from apl_jax.files import atomic_write


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty, non-comment lines of a names or prompts file; an error if there are none."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise UserError(f"{what} file {path} lists no {what} (one per line)")
    return lines


def read_names(path: Path) -> list[str]:
    names = read_lines(path, "names")
    if any("-" in n and n.rsplit("-", 1)[1].isdigit() for n in names) or len(set(names)) != len(names):
        raise UserError(f"names in {path} must be distinct and must not end in -<digits> (the file-name convention)")
    return names


def identity_prompt(name: str, name_index: int, k: int, seed: int, pre_templates, templates) -> str:
    rng = np.random.default_rng([seed, name_index, k])
    pre = [p.strip() for p in pre_templates if p.strip()]
    parts = [pre[rng.integers(len(pre))] if rng.random() < 0.5 else "", name,
             templates[rng.integers(len(templates))] if rng.random() < 0.5 else ""]
    return " ".join(p for p in parts if p)


def file_name(name: str, k: int) -> str:
    return f"{name}-{k}.png"


def generate(sampler, names: list[str], per_name: int, out, seed: int, templates_file: Path,
             negative_prompt: str | None = None) -> int:
    """Render what is missing; returns how many images were written (by this process).

    negative_prompt: None takes the templates file's generation_negative_prompt.
    """
    values = yaml.safe_load(Path(templates_file).read_text())
    negative = values.get("generation_negative_prompt", "") if negative_prompt is None else negative_prompt
    out = storage.path(out)
    # Every process lists the folder before its first batch, and no process can write before all of
    # them have joined that batch's gather, so all list the same images and render the same batches.
    existing = {p.name for p in out.iterdir()} if out.is_dir() else set()  # one listing, not a request per image
    jobs = [(n, i, k) for i, n in enumerate(names) for k in range(per_name) if file_name(n, k) not in existing]
    written = 0
    with tqdm(total=len(jobs), desc="identities", unit="img", disable=jax.process_index() != 0) as bar:
        for start in range(0, len(jobs), sampler.batch_size):
            chunk = jobs[start : start + sampler.batch_size]
            prompts = [identity_prompt(n, i, k, seed, values["pre_templates"], values["templates"]) for n, i, k in chunk]
            # Noise index = the image's place in the whole set: a resumed run draws the same noise.
            images = sampler(prompts, seed=seed, negative_prompt=negative, indices=[i * per_name + k for _, i, k in chunk])
            for j in sampler.owned(len(chunk)):  # a killed run leaves no half-written PNG
                name, _, k = chunk[j]
                atomic_write(out / file_name(name, k), lambda tmp: Image.fromarray(images[j]).save(tmp, format="PNG"))
                written += 1
            bar.update(len(chunk))
    if jax.process_count() > 1:  # the manifest only once every process has written its images
        multihost_utils.sync_global_devices("apl_jax identity images written")
    if jax.process_index() == 0:
        manifest = {"images": {file_name(n, k): n for n in names for k in range(per_name)}}
        atomic_write(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return written


def main(argv=None) -> int:
    from apl_jax.models import load_model
    from apl_jax.sampling import Sampler, SamplerConfig

    parser = argparse.ArgumentParser(prog="python -m apl_jax.generate_identities", description=__doc__.split("\n\n")[0])
    add_sampler_args(parser)
    parser.add_argument("--names", required=True, type=Path, help="text file, one NAME per line")
    parser.add_argument("--per-name", type=int, default=100)
    parser.add_argument("--out", required=True, help="output folder, local or gs://")
    parser.add_argument("--templates", type=Path, default=Path(DEFAULT_TEMPLATES))
    args = parser.parse_args(argv)
    if args.per_name < 1:
        raise UserError(f"--per-name must be at least 1, got {args.per_name}")
    names = read_names(args.names)
    out = preflight.folder(args.out, "--out")
    parallel.initialize_distributed(ParallelConfig(**parallel_settings(args)))
    enable_compilation_cache()
    sampler = Sampler(load_model(args.model, args.dtype), SamplerConfig(**sampler_settings(args)))
    written = generate(sampler, names, args.per_name, out, args.seed, args.templates)
    print(f"{args.out}: {len(names)} names x {args.per_name}; process {jax.process_index()} rendered {written}")
    return 0


if __name__ == "__main__":
    run_main(main)
