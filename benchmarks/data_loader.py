"""Can the folders loader keep up with training? Its examples/s alone next to training's steps/s x batch.

    PYTHONPATH=. python benchmarks/data_loader.py [--images 64] [--resolutions 32 256] [--batch 8]

For each resolution it generates identity and caption folders of noise photos (as costly
to decode as real ones), builds them and times the loader alone (this host = the whole
batch). Then it trains the tiny config (32 px; its attention would need tens of GB at
256 px) on the 32 px folders and reads the steady-state steps/s from metrics.jsonl.
A ratio above 1 means the loader outpaces what the step consumes; on few cores the two
share the CPUs while training, so the margin matters.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from apl_jax.config import load_config
from apl_jax.data.pipeline import folder_input
from apl_jax.tokenizer import load_tokenizer
from apl_jax.trainer import train

REPO = Path(__file__).resolve().parents[1]


def make_folders(root: Path, images: int, resolution: int) -> tuple[Path, Path]:
    """`images` face files (8 names) and `images` captioned files, a little larger than `resolution`."""
    rng = np.random.default_rng(0)
    identity, captions = root / "identity", root / "captions"
    identity.mkdir(parents=True)
    captions.mkdir()
    size = (resolution * 5 // 4, resolution * 3 // 2)  # not square: the build resizes and crops
    for i in range(images):
        for path in (identity / f"Person {i % 8}-{i // 8}.png", captions / f"{i}.png"):
            PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
    (captions / "prompts.txt").write_text("".join(f"{i} a photo of thing number {i}\n" for i in range(images)))
    return identity, captions


def loader_examples_per_s(config, batches: int) -> float:
    host = folder_input(config.data, load_tokenizer(), "alz", 0, config.train.batch_size, 0, config.train.batch_size)
    for _ in range(2):  # warm: threads started, first reads done
        host.next_batch()
    tic = time.perf_counter()
    for _ in range(batches):
        host.next_batch()
    return batches * config.train.batch_size / (time.perf_counter() - tic)


def training_steps_per_s(config, workdir: Path) -> float:
    train(config, workdir)
    rates = [json.loads(line)["steps_per_s"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[2:])  # the first steps include compilation and warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per folder (default 64)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--batch", type=int, default=8, help="global batch, as configs/tiny.yaml (default 8)")
    parser.add_argument("--batches", type=int, default=30, help="loader batches to time (default 30)")
    parser.add_argument("--steps", type=int, default=12, help="training steps to run (default 12)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loader_rates, configs = {}, {}
    with tempfile.TemporaryDirectory(prefix="apl-data-bench-") as tmp:
        for resolution in args.resolutions:
            root = Path(tmp) / f"{resolution}px"
            identity, captions = make_folders(root, args.images, resolution)
            configs[resolution] = load_config(REPO / "configs/tiny.yaml", [
                f"train.batch_size={args.batch}", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                "data.source=folders", f"data.resolution={resolution}", f"data.identity_dir={identity}",
                f"data.caption_dir={captions}", f"data.cache_dir={root / 'cache'}"])
            tic = time.perf_counter()
            loader_rates[resolution] = loader_examples_per_s(configs[resolution], args.batches)  # builds first
            print(f"{resolution}px: built and timed the loader in {time.perf_counter() - tic:.1f} s", flush=True)
        tiny = load_config(REPO / "configs/tiny.yaml").data.resolution
        if tiny not in configs:
            raise SystemExit(f"--resolutions must include the tiny config's {tiny} px, to train on")
        steps = training_steps_per_s(configs[tiny], Path(tmp) / "run")

    consumed = steps * args.batch
    print(f"\ntraining, tiny config at {tiny}px, batch {args.batch}: {steps:.2f} steps/s = {consumed:.1f} examples/s")
    print(f"loader alone, {configs[tiny].data.loader_threads} threads, {args.images} images per folder:")
    for resolution, rate in loader_rates.items():
        print(f"  {resolution:>4}px: {rate:8.0f} examples/s = {rate / consumed:6.1f}x what training consumes")

if __name__ == "__main__":
    main()
