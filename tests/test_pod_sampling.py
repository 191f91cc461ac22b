"""Sampling in 2 processes x 4 CPU devices against 1 process x 8: sample.py and generate_identities."""

import json
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_processes, sample_cli, train_env

SAMPLE = ("--prompt", "a photo of Ada Quill", "--prompt", "a red square", "--num-images", "4", "--steps", "2",
          "--seed", "3")
IDENTITIES = ("-m", "apl_jax.generate_identities", "--steps", "2", "--per-name", "5")
TOTAL = 10  # 2 names x 5: one whole batch of 8 and a padded one


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int32)


def assert_within_one_level(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


def two_processes(*args):
    # A fresh compilation cache per launch: with a shared one, process 0 can load a program that
    # process 1 still compiles, and the first CPU (gloo) collective then times out waiting for it.
    return run_processes(lambda k, address: [sys.executable, *args, "--coordinator-address", address,
                                             "--num-processes", "2", "--process-id", str(k)],
                         extra_env={"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="apl-jax-xla-")})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import subprocess

    root = tmp_path_factory.mktemp("pod-sampling")
    (root / "names.txt").write_text("Ada Quill\nBo Fenwick\n")
    done = sample_cli(*SAMPLE, "--out", str(root / "one/grid.png"), "--save-dir", str(root / "one/images"), devices=8)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, *IDENTITIES, "--names", str(root / "names.txt"), "--out", str(root / "ids1")],
                          env=train_env(8), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sample = two_processes(str(REPO / "sample.py"), *SAMPLE, "--out", str(root / "two/grid.png"),
                           "--save-dir", str(root / "two/images"))
    identities = two_processes(*IDENTITIES, "--names", str(root / "names.txt"), "--out", str(root / "ids2"))
    complete = {p.name: pixels(p) for p in (root / "ids2").glob("*.png")}
    # An interrupted run: three images and the manifest never written. The rerun draws exactly those.
    for name in ("Ada Quill-4.png", "Bo Fenwick-0.png", "Bo Fenwick-3.png", "manifest.json"):
        (root / "ids2" / name).unlink()
    resumed = two_processes(*IDENTITIES, "--names", str(root / "names.txt"), "--out", str(root / "ids2"))
    return root, {"sample": sample, "identities": identities, "resumed": resumed, "complete": complete}


def rendered(outputs):
    """How many images each process says it wrote."""
    return [int(out.split("rendered ")[1].split()[0]) for out in outputs]


def test_sample_grid_and_images_match_one_process(runs):
    root, logs = runs
    assert_within_one_level(pixels(root / "two/grid.png"), pixels(root / "one/grid.png"))
    one, two = sorted((root / "one/images").iterdir()), sorted((root / "two/images").iterdir())
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 8
    for a, b in zip(one, two):
        assert_within_one_level(pixels(b), pixels(a))
    assert sum("wrote" in out for out in logs["sample"]) == 1  # process 0 alone writes the grid


def test_identity_set_is_complete_once_and_matches_one_process(runs):
    root, logs = runs
    assert rendered(logs["identities"]) == [6, 4]  # process 0: rows 0-3 of batch 1 and the 2 of batch 2
    assert sorted(p.name for p in (root / "ids2").iterdir()) == sorted(p.name for p in (root / "ids1").iterdir())
    assert len(list((root / "ids2").glob("*.png"))) == TOTAL and not list((root / "ids2").glob("*.tmp"))
    manifest = json.loads((root / "ids2/manifest.json").read_text())
    assert manifest == json.loads((root / "ids1/manifest.json").read_text()) and len(manifest["images"]) == TOTAL
    for name, image in logs["complete"].items():
        assert_within_one_level(image, pixels(root / "ids1" / name))


def test_interrupted_identity_set_resumes(runs):
    root, logs = runs
    assert sum(rendered(logs["resumed"])) == 3
    for name, image in logs["complete"].items():
        np.testing.assert_array_equal(pixels(root / "ids2" / name), image)  # the same noise on resume
    assert (root / "ids2/manifest.json").is_file()
