"""The folder datasets (tfds array_record builds), the APL prompt stream over them and the grain host input."""

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import safetensors.numpy
import yaml

from apl_jax.config import DataConfig, load_config
from apl_jax.data import builders
from apl_jax.data.pipeline import FolderExamples, StreamInput, folder_input, load_datasets
from apl_jax.data.prompts import Templates
from apl_jax.errors import UserError
from apl_jax.tokenizer import load_tokenizer, tokenize
from apl_jax.trainer import make_input, train
from conftest import REPO

RED, GREEN, BLUE, YELLOW = (200, 40, 40), (40, 170, 60), (40, 70, 200), (220, 200, 40)
ALICE_ATTR = "A female person, British descent, brown hair, brown eyes."
BOB_ATTR = "A male person, European descent, blond hair, blue eyes."


def solid(colour, width=32, height=32) -> np.ndarray:
    return np.broadcast_to(np.uint8(colour), (height, width, 3)).copy()


def bands(width=64, height=32) -> np.ndarray:
    """Red | green | blue columns: centre-cropping to a square keeps only the green."""
    image = solid(GREEN, width, height)
    image[:, : width // 4], image[:, -width // 4 :] = RED, BLUE
    return image


def write_images(folder, images: dict) -> None:
    for file, pixels in images.items():
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels).save(folder / file)


# Source images and the 32 px crop each one must come back as.
IDENTITY_IMAGES = {"alice/0.png": solid(RED), "alice/1.png": bands(), "bob/0.png": solid(BLUE, 64, 64),
                   "bob/1.png": solid(YELLOW, 48, 40)}
EXPECTED = {"alice/0.png": solid(RED), "alice/1.png": solid(GREEN), "bob/0.png": solid(BLUE), "bob/1.png": solid(YELLOW)}
NAMES = {"alice/0.png": "Alice Smith", "alice/1.png": "Alice Smith", "bob/0.png": "Bob Jones", "bob/1.png": "Bob Jones",
         "bob/broken.png": "Bob Jones"}
CAPTIONS = [("cat.png", "a red cat"), ("dog.png", "a green dog"), ("house.png", "a blue house"),
            ("house.png", "a house under a blue sky")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    write_images(root / "identity", IDENTITY_IMAGES)
    (root / "identity/bob/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "identity/manifest.yaml").write_text(yaml.safe_dump(
        {"images": NAMES, "attributes": {"Alice Smith": ALICE_ATTR, "Bob Jones": BOB_ATTR}}))
    write_images(root / "faces", {"Alice Smith-0.png": solid(RED), "Alice Smith-1.png": solid(GREEN),
                                  "Bob Jones-0.png": solid(BLUE)})
    write_images(root / "captions", {"cat.png": solid(RED), "dog.png": solid(GREEN), "house.png": solid(BLUE)})
    (root / "captions/captions.jsonl").write_text(
        "\n".join(json.dumps({"file": f, "caption": c}) for f, c in CAPTIONS) + "\n")
    write_images(root / "prompts", {"1.png": solid(RED), "2.png": solid(GREEN), "10.png": solid(BLUE)})
    (root / "prompts/prompts.txt").write_text("0 first\n1 second\n2 third\n")
    return root


@pytest.fixture(scope="module")
def built(folders, tmp_path_factory):
    """DataConfig of the fixture folders, with their datasets built once into a module cache."""
    data = DataConfig(source="folders", identity_dir=str(folders / "identity"), caption_dir=str(folders / "captions"),
                      cache_dir=str(tmp_path_factory.mktemp("cache")), templates=str(REPO / "configs/data/templates.yaml"))
    return data, *load_datasets(data)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def records(source) -> dict:
    return {record["file"].decode(): record for record in (source[i] for i in range(len(source)))}


def test_identity_build_reads_back_resized_crops(folders, built):
    _, identity, _ = built
    assert identity.dataset_info.metadata["skipped"] == ["bob/broken.png"]
    by_file = records(identity)
    assert sorted(by_file) == sorted(EXPECTED)
    for file, record in by_file.items():
        np.testing.assert_array_equal(record["image"], EXPECTED[file], err_msg=file)
        assert record["name"].decode() == NAMES[file]
        assert record["attribute"].decode() == {"Alice Smith": ALICE_ATTR, "Bob Jones": BOB_ATTR}[NAMES[file]]
        assert record["sha256"].decode() == hashlib.sha256((folders / "identity" / file).read_bytes()).hexdigest()


def test_skipped_images_are_reported_on_every_run(folders, built, caplog):
    data, _, _ = built  # built once already; this run only reads the cache
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        load_datasets(dataclasses.replace(data, identity_prob=1.0))
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.data.builders"] == [
        f"identity_faces: skipped 1 unreadable or corrupt image(s) of 5 in {folders / 'identity'}: bob/broken.png"]


def test_a_caption_too_long_for_the_prefix_is_reported_once(tokenizer, caplog):
    # 68 tokens with start and end: the neutral prompt fits; "alz CAPTION" is 69, and 78 once alz becomes 10 vectors
    caption = "a photo of " + "a very long caption " * 15 + "with a tail"
    captions = [{"caption": caption.encode(), "image": solid(RED)}]
    examples = FolderExamples(None, captions, tokenizer, "alz", Templates.load(REPO / "configs/data/templates.yaml"),
                              identity_prob=0.0, neutral_mode="empty", seed=0, num_vectors=10)
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        for index in range(3):
            examples.example(index)
    assert [r.getMessage() for r in caplog.records if r.name == "apl_jax.tokenizer"] == [
        f"prompt cut at 77 tokens (it has 78 with the prefix's 9 extra tokens); the text encoder never sees the rest: "
        f"{'alz ' + caption!r}"]


def test_official_file_names_give_the_names(folders):
    items = builders.scan_identity_folder(folders / "faces")
    assert [(i.file, i.labels["name"]) for i in items] == [
        ("Alice Smith-0.png", "Alice Smith"), ("Alice Smith-1.png", "Alice Smith"), ("Bob Jones-0.png", "Bob Jones")]
    assert all(i.labels["attribute"] == "" for i in items)


def test_caption_builds(folders, built, tmp_path):
    _, _, captions = built
    got = sorted((captions[i]["file"].decode(), captions[i]["caption"].decode()) for i in range(len(captions)))
    assert got == sorted(CAPTIONS)  # an image may carry several captions
    np.testing.assert_array_equal(captions[0]["image"], solid(RED))
    # prompts.txt: lines in idx order go to the images in natural order (2.png before 10.png).
    items = builders.scan_caption_folder(folders / "prompts")
    assert [(i.file, i.labels["caption"]) for i in items] == [("1.png", "first"), ("2.png", "second"), ("10.png", "third")]
    source = builders.load(builders.CaptionPairs, folders / "prompts", items, 32, tmp_path)
    np.testing.assert_array_equal(records(source)["10.png"]["image"], solid(BLUE))


def test_changed_source_files_are_rebuilt(folders, tmp_path):
    folder = tmp_path / "faces"
    shutil.copytree(folders / "faces", folder)

    def build():
        source = builders.load(builders.IdentityFaces, folder, builders.scan_identity_folder(folder), 32, tmp_path / "c")
        return source.dataset_info.data_dir, records(source)["Bob Jones-0.png"]["image"]

    def written(data_dir):
        return [(p.name, p.stat().st_mtime_ns) for p in sorted(Path(data_dir).iterdir())]

    first_dir, pixels = build()
    np.testing.assert_array_equal(pixels, solid(BLUE))
    first_files = written(first_dir)
    assert build()[0] == first_dir and written(first_dir) == first_files  # unchanged sources: the build is reused
    write_images(folder, {"Bob Jones-0.png": solid(YELLOW)})
    second_dir, pixels = build()
    assert second_dir != first_dir
    np.testing.assert_array_equal(pixels, solid(YELLOW))


# (private, neutral) of examples 0..7 for seed 0. Which examples are identity ones and which record
# each takes depend only on (seed, index), so both modes pick the same people and captions.
GENERIC = {0: ("alz a blue house", "a blue house"), 1: ("alz a green dog", "a green dog"),
           3: ("alz a house under a blue sky", "a house under a blue sky"), 4: ("alz a green dog", "a green dog")}
EXPECTED_PROMPTS = {
    "empty": {**GENERIC, 2: ("alz Bob Jones", ""), 5: ("alz Bob Jones", ""), 6: ("alz Alice Smith", ""),
              7: ("alz Bob Jones", "")},
    "prompt": {**GENERIC, 2: ("alz Bob Jones", "a photo of a person"), 5: ("alz Bob Jones", "a photo of a person"),
               6: ("alz Alice Smith", "a photo of a person"), 7: ("alz Bob Jones", "a photo of a person")},
    "attributes": {
        **GENERIC,
        2: ("alz A close-up photo of Bob Jones in the street",
            "A close-up photo of A male person in the street, European descent, blond hair, blue eyes."),
        5: ("alz Bob Jones in the street", "A male person in the street, European descent, blond hair, blue eyes."),
        6: ("alz Alice Smith looking at the camera",
            "A female person looking at the camera, British descent, brown hair, brown eyes."),
        7: ("alz A portrait of Bob Jones in an office",
            "A portrait of A male person in an office, European descent, blond hair, blue eyes."),
    },
}


@pytest.mark.parametrize("neutral_mode", ["empty", "prompt", "attributes"])
def test_exact_prompts_for_a_fixed_seed(built, tokenizer, neutral_mode):
    data, identity, captions = built
    examples = FolderExamples(identity, captions, tokenizer, "alz", Templates.load(data.templates),
                              identity_prob=0.5, neutral_mode=neutral_mode, seed=0,
                              neutral_prompt=data.neutral_prompt)
    prompts = [examples.prompts(g)[1:] for g in range(8)]
    assert prompts == [EXPECTED_PROMPTS[neutral_mode][g] for g in range(8)]
    if neutral_mode == "prompt":  # private templates: the attributes mode's draws, the fixed neutral prompt
        templated = FolderExamples(identity, captions, tokenizer, "alz", Templates.load(data.templates),
                                   identity_prob=0.5, neutral_mode="prompt", seed=0,
                                   neutral_prompt="a face", private_templates=True)
        assert [templated.prompts(g)[1:] for g in range(8)] == [
            (EXPECTED_PROMPTS["attributes"][g][0], "a face" if g in (2, 5, 6, 7) else GENERIC[g][1]) for g in range(8)]
    example = examples.example(3)
    np.testing.assert_array_equal(example["private_ids"], tokenize(tokenizer, [prompts[3][0]])[0])
    np.testing.assert_array_equal(example["neutral_ids"], tokenize(tokenizer, [prompts[3][1]])[0])


def stream(examples, host_first, host_count, batches, state=None) -> list[dict]:
    host = StreamInput(examples, 6, host_first, host_count, threads=3)
    if state is not None:
        host.set_state(json.loads(json.dumps(state)))
    return [host.next_batch() for _ in range(batches)]


@pytest.fixture(scope="module")
def examples(built, tokenizer):
    data, identity, captions = built
    return FolderExamples(identity, captions, tokenizer, "alz", Templates.load(data.templates),
                          identity_prob=0.5, neutral_mode="attributes", seed=3)


def test_hosts_slices_are_disjoint_and_cover_the_global_batch(examples):
    whole = stream(examples, 0, 6, 3)
    first, second = stream(examples, 0, 2, 3), stream(examples, 2, 4, 3)
    for b in range(3):
        for key, value in whole[b].items():
            np.testing.assert_array_equal(np.concatenate([first[b][key], second[b][key]]), value)
        for k in range(6):  # example k of global batch b is global example 6b + k
            expected = examples.example(6 * b + k)
            assert all(np.array_equal(whole[b][key][k], expected[key]) for key in expected)


def test_resumed_stream_equals_the_uninterrupted_one(examples):
    host = StreamInput(examples, 6, 2, 4, threads=3)
    uninterrupted = [host.next_batch() for _ in range(5)]
    state = host.get_state()
    assert state == {"next_example": 30}
    interrupted = StreamInput(examples, 6, 2, 4, threads=3)
    [interrupted.next_batch() for _ in range(2)]
    assert json.loads(json.dumps(interrupted.get_state())) == {"next_example": 12}
    # Any host resumes from process 0's state: here host (2, 4) from host (0, 2)'s.
    process0 = StreamInput(examples, 6, 0, 2, threads=3)
    [process0.next_batch() for _ in range(2)]
    resumed = stream(examples, 2, 4, 3, state=process0.get_state())
    for a, b in zip(resumed, uninterrupted[2:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_folder_input_from_config(built, tokenizer):
    data, _, _ = built
    batch = folder_input(data, tokenizer, "alz", 0, 4, 0, 4).next_batch()
    assert batch["pixels"].shape == (4, 32, 32, 3) and batch["pixels"].dtype == np.uint8
    assert batch["private_ids"].shape == batch["neutral_ids"].shape == (4, 77)
    assert batch["private_ids"].dtype == np.int32


# ---------------------------------------------------------------- bad input


def folder_with(tmp_path, images: dict, files: dict | None = None):
    folder = tmp_path / "src"
    folder.mkdir()
    write_images(folder, images)
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "nope", r"data.identity_dir: folder .*nope does not exist"),
    (lambda t: folder_with(t, {}), r"src has no images \(.png, .jpg"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"manifest.yaml": "images:\n  a.png: A\n  b.png: B\n"}),
     r"manifest.yaml names b.png, which does not exist in .*src"),
    (lambda t: folder_with(t, {"a.png": solid(RED), "c.png": solid(RED)}, {"manifest.yaml": "images:\n  a.png: A\n"}),
     r"manifest.yaml gives a NAME for 1 of the 2 images in .*src; none for c.png"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"manifest.json": "{\"images\": {\"a.png\": 3}}"}),
     r"manifest.json: images must map strings to non-empty strings"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"manifest.yaml": "images: [a.png"}),
     r"manifest .*manifest.yaml cannot be parsed"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}), r"identity image a.png is not named <Name>-<idx>.png"),
])
def test_bad_identity_folders(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        builders.scan_identity_folder(make(tmp_path))


def test_attributes_mode_needs_every_name(folders):
    with pytest.raises(UserError, match=r"data.neutral_mode=attributes needs an attribute description for every NAME; "
                                        r".*faces has none for 'Alice Smith' and 1 more"):
        builders.scan_identity_folder(folders / "faces", need_attributes=True)


@pytest.mark.parametrize("make, message", [
    (lambda t: folder_with(t, {"a.png": solid(RED)}), r"caption folder .*src needs exactly one caption file, "
                                                      r"captions.jsonl or prompts.txt; found 0"),
    (lambda t: folder_with(t, {"a.png": solid(RED), "b.png": solid(RED)}, {"prompts.txt": "0 a\n1 b\n2 c\n"}),
     r"prompts.txt has 3 captions for 2 images in .*src"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"prompts.txt": "a red thing\n"}),
     r"prompts.txt line 1 must be '<idx> <caption>', got 'a red thing'"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"captions.jsonl": '{"file": "b.png", "caption": "x"}\n'}),
     r"captions.jsonl names b.png, which does not exist"),
    (lambda t: folder_with(t, {"a.png": solid(RED), "b.png": solid(RED)}, {"captions.jsonl": '{"file": "a.png", "caption": "x"}\n'}),
     r"captions.jsonl gives a caption for 1 of the 2 images in .*src; none for b.png"),
    (lambda t: folder_with(t, {"a.png": solid(RED)}, {"captions.jsonl": '{"file": "a.png"}\n'}),
     r'captions.jsonl line 1 must be \{"file": ..., "caption": ...\} with a non-empty caption'),
])
def test_bad_caption_folders(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        builders.scan_caption_folder(make(tmp_path))


def test_all_images_unreadable_is_an_error(tmp_path):
    folder = folder_with(tmp_path, {}, {"A-0.png": "garbage", "A-1.jpg": ""})
    with pytest.raises(UserError, match=r"no readable image in .*src: all 2 are unreadable or corrupt"):
        builders.load(builders.IdentityFaces, folder, builders.scan_identity_folder(folder), 32, tmp_path / "cache")


@pytest.mark.parametrize("overrides, message", [
    (["data.resolution=30"], r"data.resolution=30 is not divisible by the VAE factor 4"),
    (["data.source=folders", "data.caption_dir=/x"], r"data.identity_prob=0.5 needs data.identity_dir"),
    (["data.source=folders", "data.identity_dir=/x"], r"data.identity_prob=0.5 needs data.caption_dir"),
    (["data.source=folders", "data.identity_dir=/x", "data.caption_dir=/y", "data.neutral_mode=attr"],
     r"data.neutral_mode must be one of empty, prompt, attributes, got 'attr'"),
    (["data.source=folders", "data.identity_dir=/x", "data.caption_dir=/y", "data.neutral_mode=prompt",
      "data.neutral_prompt=''"], r"data.neutral_mode=prompt needs a data.neutral_prompt \(for the empty one, use "
                                r"data.neutral_mode=empty\)"),
    (["data.source=folders", "data.identity_dir=/nope", "data.identity_prob=1"],
     r"data.identity_dir: folder /nope does not exist"),
    (["data.source=files"], r"config key data.source must be one of synthetic, folders, got 'files'"),
    (["data.identity_dir=/x"], r"only apply to data.source=folders; add --set data.source=folders"),
    (["data.private_templates=true"], r"data.private_templates only apply to data.source=folders"),
])
def test_bad_data_config(overrides, message):
    model = SimpleNamespace(vae_scale_factor=4, tokenizer=None)  # all make_input reads before these errors
    with pytest.raises(UserError, match=message):
        make_input(load_config(REPO / "configs/tiny.yaml", ["train.batch_size=2", *overrides]), model)


# ---------------------------------------------------------------- training on folders


def test_training_on_folders_resumes_exactly(built, tmp_path):
    data, _, _ = built

    def run(workdir, steps):
        config = load_config(REPO / "configs/tiny.yaml", [
            "train.batch_size=2", f"train.steps={steps}", "data.source=folders", f"data.identity_dir={data.identity_dir}",
            f"data.caption_dir={data.caption_dir}", f"data.cache_dir={data.cache_dir}"])
        return train(config, workdir)

    assert run(tmp_path / "straight", 2).step == 2
    assert run(tmp_path / "resumed", 1).step == 1
    assert run(tmp_path / "resumed", 2).step == 2
    prefix = [safetensors.numpy.load_file(tmp_path / run / "prefix.safetensors")["<alz>"] for run in ("straight", "resumed")]
    np.testing.assert_array_equal(*prefix)
