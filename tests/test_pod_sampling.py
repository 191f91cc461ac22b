"""2 processes x 4 CPU devices against 1 process x 8: sample.py, generate_identities, evaluate and mini eval."""

import json
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, evaluate_args, run_processes, train_env

SAMPLE = ("--prompt", "a photo of Ada Quill", "--prompt", "a red square", "--num-images", "4", "--steps", "2",
          "--seed", "3")
IDENTITIES = ("-m", "apl_jax.generate_identities", "--steps", "2", "--per-name", "5")
TOTAL = 10  # 2 names x 5: one whole batch of 8 and a padded one


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int32)


def assert_within_one_level(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


def one_process(*args):
    """python ARGS in 1 process x 8 CPU devices; its merged output."""
    done = subprocess.run([sys.executable, *args], env=train_env(8), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def two_processes(*args):
    # A fresh compilation cache per launch: with a shared one, process 0 can load a program that
    # process 1 still compiles, and the first CPU (gloo) collective then times out waiting for it.
    return run_processes(lambda k, address: [sys.executable, *args, "--coordinator-address", address,
                                             "--num-processes", "2", "--process-id", str(k)],
                         extra_env={"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="apl-jax-xla-")})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("pod-sampling")
    (root / "names.txt").write_text("Ada Quill\nBo Fenwick\n")
    sample = (str(REPO / "sample.py"), *SAMPLE, "--model", str(tiny_folder))
    identities = (*IDENTITIES, "--model", str(tiny_folder), "--names", str(root / "names.txt"))
    one_process(*sample, "--out", str(root / "one/grid.png"), "--save-dir", str(root / "one/images"))
    one_process(*identities, "--out", str(root / "ids1"))
    sampled = two_processes(*sample, "--out", str(root / "two/grid.png"), "--save-dir", str(root / "two/images"))
    drawn = two_processes(*identities, "--out", str(root / "ids2"))
    complete = {p.name: pixels(p) for p in (root / "ids2").glob("*.png")}
    # An interrupted run: three images and the manifest never written. The rerun draws exactly those.
    for name in ("Ada Quill-4.png", "Bo Fenwick-0.png", "Bo Fenwick-3.png", "manifest.json"):
        (root / "ids2" / name).unlink()
    resumed = two_processes(*identities, "--out", str(root / "ids2"))
    return root, {"sample": sampled, "identities": drawn, "resumed": resumed, "complete": complete}


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


def assert_same_numbers(actual, expected, where="report"):
    """The same structure and values; floats to 1e-3 relative (images within one pixel level move scores a little)."""
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same_numbers(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for k, (a, b) in enumerate(zip(actual, expected)):
            assert_same_numbers(a, b, f"{where}[{k}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-3, abs=1e-5), where
    else:
        assert actual == expected, where


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- python -m apl_jax.evaluate

EVAL_IMAGES = 5  # per prompt: 10 identity images (a whole batch of 8 and a padded one), 5 generic ones


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, eval_inputs, tiny_folder, clip_folder):
    root = tmp_path_factory.mktemp("pod-evaluate")

    def args(out, *extra):
        return ["-m", "apl_jax.evaluate", *evaluate_args(eval_inputs, root / out, "--model", str(tiny_folder),
                                                         "--num-images", str(EVAL_IMAGES),
                                                         "--prompts", str(eval_inputs / "prompts.txt"),
                                                         "--clip-model", str(clip_folder), *extra)]

    one_process(*args("one"))
    two = two_processes(*args("two"))
    report = json.loads((root / "two/report.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "two/images").rglob("*.png")}
    reused = two_processes(*args("two", "--reuse"))
    return root, {"two": two, "report": report, "mtimes": mtimes, "reused": reused}


def test_evaluate_images_are_complete_once_and_match_one_process(evaluations):
    root, logs = evaluations
    assert files(root / "two") == files(root / "one")  # no file missing, none extra, no *.tmp left
    images = [p for p in files(root / "one") if p.endswith(".png") and p.startswith("images/")]
    assert len(images) == (2 + 1) * EVAL_IMAGES * 2  # (2 names + 1 generic prompt) x images x 2 conditions
    for name in images:
        assert_within_one_level(pixels(root / "two" / name), pixels(root / "one" / name))
    for group, prompts in (("identity", 2), ("generic", 1)):
        manifest = json.loads((root / "two/images" / group / "manifest.json").read_text())
        assert manifest == json.loads((root / "one/images" / group / "manifest.json").read_text())
        listed = manifest["files"]["plain"] + manifest["files"]["prefix"]
        assert len(set(listed)) == len(listed) == prompts * EVAL_IMAGES * 2


def test_evaluate_report_matches_one_process_and_is_written_once(evaluations):
    root, logs = evaluations
    assert_same_numbers(logs["report"], json.loads((root / "one/report.json").read_text()))
    assert [out.count("wrote ") for out in logs["two"]] == [1, 0]  # process 0 writes the report
    # Every process scores every image: one that left early would wait for process 0 in JAX's shutdown
    # barrier, which gives up after 5 minutes (a real evaluation's face embeddings take longer) and then
    # aborts process 0 too.
    scored = re.compile(rf"face embeddings \(fake\): 100%\|.*\| {4 * EVAL_IMAGES}/{4 * EVAL_IMAGES} ")
    assert all(scored.search(out) for out in logs["two"])


def test_evaluate_reuse_in_two_processes(evaluations):
    root, logs = evaluations
    for out in logs["reused"]:
        assert out.count("reusing the images in") == 2 and "sampling" not in out
    assert {p: p.stat().st_mtime_ns for p in logs["mtimes"]} == logs["mtimes"]
    assert json.loads((root / "two/report.json").read_text()) == logs["report"]


# ---------------------------------------------------------------- python -m apl_jax.mini eval

MINI_WIDTH = 64  # apl-mini's text width (test_mini checks it)


@pytest.fixture(scope="module")
def mini_evaluations(tmp_path_factory):
    """mini eval of a random prefix, 1 image per name and prompt kind, 2 steps: 48 identity images per condition
    (a padded batch of 64 that both processes draw) and 120 scene images (every scene once)."""
    from apl_jax.export import save_diffusers_prefix

    root = tmp_path_factory.mktemp("pod-mini")
    prefix = np.random.default_rng(0).uniform(size=(10, MINI_WIDTH)).astype(np.float32)
    save_diffusers_prefix(root / "prefix.safetensors", prefix, "alz")

    def args(out):
        return ["-m", "apl_jax.mini", "eval", "--prefix", str(root / "prefix.safetensors"), "--num-images", "1",
                "--steps", "2", "--out", str(root / out)]

    one_process(*args("one"))
    return root, two_processes(*args("two"))


def test_mini_eval_report_matches_one_process_and_is_written_once(mini_evaluations):
    root, outputs = mini_evaluations
    assert files(root / "two") == files(root / "one") == ["chart.png", "grid.png", "report.json", "report.md"]
    report = json.loads((root / "two/report.json").read_text())
    assert report["num_images"] == 1 and len(report["identities"]) == 24
    by_word = report["generic"]["by_word"]
    assert list(by_word) == ["plain", "prefix"] and list(by_word["plain"]) == list(by_word["prefix"])
    assert "Scene accuracy by the word the prompt names:" in (root / "two/report.md").read_text()
    assert_same_numbers(report, json.loads((root / "one/report.json").read_text()))
    assert_within_one_level(pixels(root / "two/grid.png"), pixels(root / "one/grid.png"))
    assert [out.count("wrote ") for out in outputs] == [1, 0]
