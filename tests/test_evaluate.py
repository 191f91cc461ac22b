import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from apl_jax import evaluate
from apl_jax.errors import UserError
from apl_jax.face_id import (
    ARCFACE_TEMPLATE, FakeEmbedder, align_face, identity_score, make_embedder, reference_embedding, reference_photos,
    similarity_transform, summarise, unit,
)
from conftest import EVAL_NAMES, REPO, evaluate_args, train_env

EVAL_EXTRA = "the [eval] extra (pip install -r requirements-eval.txt) is not installed"


def no_face_images():
    shapes = np.zeros((200, 200, 3), np.uint8)
    shapes[20:80, 30:150] = [255, 0, 0]
    shapes[100:180, 60:120] = [0, 0, 255]
    return [np.full((120, 120, 3), [200, 180, 160], np.uint8), shapes]


@pytest.fixture(scope="module")
def photos():
    """Two real people: scikit-image's astronaut (Eileen Collins) and matplotlib's Grace Hopper."""
    skimage_data = pytest.importorskip("skimage.data", reason=EVAL_EXTRA)
    import matplotlib.cbook

    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return {"collins": skimage_data.astronaut(), "hopper": np.asarray(hopper)}


@pytest.fixture(scope="module")
def dlib_embedder():
    pytest.importorskip("dlib", reason=EVAL_EXTRA)
    return make_embedder("dlib")


# ---------------------------------------------------------------- dlib on real photos

def test_dlib_same_person_scores_far_above_another_person(dlib_embedder, photos):
    collins, hopper = photos["collins"], photos["hopper"]
    embed = dlib_embedder.embed
    reference = {name: embed(image) for name, image in photos.items()}
    assert all(v.shape == (128,) and np.isclose(np.linalg.norm(v), 1) for v in reference.values())
    same = {
        "collins flipped": reference["collins"] @ embed(collins[:, ::-1]),
        "collins half size": reference["collins"] @ embed(np.asarray(Image.fromarray(collins).resize((256, 256)))),
        "hopper flipped": reference["hopper"] @ embed(hopper[:, ::-1]),
        "hopper cropped": reference["hopper"] @ embed(hopper[60:460, 80:480]),
    }
    different = reference["collins"] @ reference["hopper"]
    # measured: 0.992, 0.989, 0.990, 0.997 against 0.882 (dlib's descriptors are not centred, so
    # different people still have a high cosine; what matters is the gap)
    assert min(same.values()) > 0.97, same
    assert different < 0.92
    for image in no_face_images():
        assert embed(image) is None


def test_reference_embedding_averages_the_photos(dlib_embedder, photos, tmp_path):
    person = tmp_path / "refs" / "Eileen_Collins"
    person.mkdir(parents=True)
    Image.fromarray(photos["collins"]).save(person / "a.jpg", quality=95)
    Image.fromarray(np.ascontiguousarray(photos["collins"][:, ::-1])).save(person / "b.png")
    Image.fromarray(no_face_images()[0]).save(person / "c.png")
    (person / "notes.txt").write_text("not a photo")
    files = reference_photos(tmp_path / "refs", "Eileen Collins")  # spaces may be underscores on disk
    assert [p.name for p in files] == ["a.jpg", "b.png", "c.png"]
    reference = reference_embedding(dlib_embedder, files, "Eileen Collins")
    assert (reference.photos, reference.faces) == (3, 2)
    assert reference.embedding @ dlib_embedder.embed(photos["collins"]) > 0.99
    with pytest.raises(UserError, match=r"no face found in any of the 1 reference photos of 'Nobody'"):
        reference_embedding(dlib_embedder, files[2:], "Nobody")


# ---------------------------------------------------------------- ArcFace alignment and ONNX path

def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    recovered = similarity_transform(moved, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(recovered[:, :2], rotation.T / scale, atol=1e-12)
    np.testing.assert_allclose(moved @ recovered[:, :2].T + recovered[:, 2], ARCFACE_TEMPLATE, atol=1e-9)
    transform = pytest.importorskip("skimage.transform", reason=EVAL_EXTRA)  # what insightface itself uses
    noisy = moved + np.random.default_rng(0).normal(0, 2, moved.shape)
    reference = transform.SimilarityTransform.from_estimate(noisy, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(similarity_transform(noisy, ARCFACE_TEMPLATE), reference.params[:2], atol=1e-9)


def test_align_face_puts_landmarks_on_the_template():
    image = np.zeros((160, 160, 3), np.uint8)
    offset = np.array([17, 23])  # a pure shift by whole pixels: bilinear sampling is then exact
    landmarks = ARCFACE_TEMPLATE + offset
    for x, y in np.round(ARCFACE_TEMPLATE).astype(int) + offset:
        image[y, x] = 255
    aligned = align_face(image, landmarks)
    assert aligned.shape == (112, 112, 3)
    lit = {tuple(p) for p in np.argwhere(aligned[..., 0] > 250)[:, ::-1]}  # 254 or 255: float rounding
    assert lit == {tuple(p) for p in np.round(ARCFACE_TEMPLATE).astype(int)}


@pytest.fixture(scope="module")
def fake_arcface(tmp_path_factory):
    """An ONNX 'ArcFace' that returns its input flattened, so the embedding shows the preprocessing."""
    pytest.importorskip("dlib", reason=EVAL_EXTRA)
    onnx = pytest.importorskip("onnx", reason=EVAL_EXTRA)
    pytest.importorskip("onnxruntime", reason=EVAL_EXTRA)
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input.1"], ["embedding"], axis=1)], "fake_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3 * 112 * 112])],
    )
    path = tmp_path_factory.mktemp("arcface") / "fake.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return make_embedder(f"arcface:{path}")


def test_arcface_embedder_preprocessing(fake_arcface, photos):
    points = fake_arcface.five_points(photos["collins"])
    left_eye, right_eye, nose, left_mouth, right_mouth = points
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    face = align_face(photos["collins"], points)
    expected = unit(((face.astype(np.float64) - 127.5) / 127.5).transpose(2, 0, 1).ravel())  # RGB, CHW, [-1, 1]
    np.testing.assert_allclose(fake_arcface.embed(photos["collins"]), expected, atol=1e-6)
    assert fake_arcface.name == "arcface:fake.onnx"
    for image in no_face_images():
        assert fake_arcface.embed(image) is None


# ---------------------------------------------------------------- ID-score arithmetic

def test_id_score_mean_max_and_skipped_faces():
    reference = np.array([1.0, 0.0])
    at = lambda degrees: np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])  # noqa: E731
    first = identity_score([at(0), None, at(60), at(90)], reference)  # cosines 1, 0.5, 0; one image without a face
    assert (first.mean, first.max, first.faces, first.images) == pytest.approx((0.5, 1.0, 3, 4))
    nobody = identity_score([None, None], reference)
    assert (nobody.mean, nobody.max, nobody.faces, nobody.images) == (0.0, 0.0, 0, 2)
    third = identity_score([at(180), at(120)], reference)
    assert (third.mean, third.max) == pytest.approx((-0.75, -0.5))
    summary = summarise([first, nobody, third])
    assert summary == pytest.approx({"mean": (0.5 + 0 - 0.75) / 3, "max": (1 + 0 - 0.5) / 3, "detection_rate": 5 / 8})


def test_fake_embedder_is_deterministic():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    embedder = FakeEmbedder()
    np.testing.assert_array_equal(embedder.embed(image), embedder.embed(image.copy()))
    assert np.isclose(np.linalg.norm(embedder.embed(image)), 1)
    assert embedder.embed(np.full((32, 32, 3), 90, np.uint8)) is None


def test_embedder_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="--embedder must be dlib, arcface:PATH.onnx or fake, got 'facenet'"):
        make_embedder("facenet")
    with pytest.raises(UserError, match=r"ArcFace model .*missing.onnx does not exist"):
        make_embedder(f"arcface:{tmp_path / 'missing.onnx'}")
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if the [eval] extra were not installed
    with pytest.raises(UserError, match=r"needs the \[eval\] extra: pip install -r requirements-eval.txt"):
        make_embedder("dlib")


# ---------------------------------------------------------------- CLIP score

@pytest.fixture(scope="module")
def scorer(clip_folder):
    from apl_jax.clip_score import ClipScorer

    return ClipScorer(clip_folder)


def test_clip_preprocessing_matches_a_hand_computation(scorer):
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    # shorter side 40 -> 32 bicubic (so 60 -> 48), centre crop 32, CLIP's mean and std
    resized = np.asarray(Image.fromarray(image).resize((48, 32), Image.BICUBIC), np.float64)[:, 8:40] / 255
    expected = (resized - [0.48145466, 0.4578275, 0.40821073]) / [0.26862954, 0.26130258, 0.27577711]
    pixels = scorer.preprocess(image[None])
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0].transpose(1, 2, 0), expected, atol=1e-5)


def test_clip_scores_are_scaled_cosines(scorer):
    images = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)  # more than one batch
    prompts = ["a red square", "a photo of a cat"] * 5
    image_vectors, text_vectors = scorer.image_embeddings(images), scorer.text_embeddings(prompts)
    assert image_vectors.shape == (10, 16) and text_vectors.shape == (10, 16)
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1, atol=1e-6)
    scores = scorer.scores(images, prompts)
    np.testing.assert_allclose(scores, 100 * np.sum(image_vectors * text_vectors, axis=1), atol=1e-4)
    assert np.all(np.abs(scores) <= 100) and scores[0] != scores[1]


def test_clip_folder_errors(tmp_path):
    from apl_jax.clip_score import ClipScorer

    with pytest.raises(UserError, match="has no config.json"):
        ClipScorer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no flax_model.msgpack or model.safetensors"):
        ClipScorer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="could not be loaded"):
        ClipScorer(tmp_path)


# ---------------------------------------------------------------- the CLI end to end

def test_evaluate_end_to_end_then_reuse(eval_inputs, clip_folder, tmp_path, monkeypatch):
    from apl_jax.clip_score import ClipScorer

    scored_texts = []
    text_embeddings = ClipScorer.text_embeddings
    monkeypatch.setattr(ClipScorer, "text_embeddings",
                        lambda self, prompts: scored_texts.extend(prompts) or text_embeddings(self, prompts))
    out = tmp_path / "eval"
    args = evaluate_args(eval_inputs, out, "--prompts", str(eval_inputs / "prompts.txt"), "--clip-model", str(clip_folder))
    assert evaluate.main(args) == 0

    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"settings", "id_score", "clip_score", "grids"}
    ids = report["id_score"]
    assert ids["embedder"] == "fake" and set(ids) == {"embedder", "plain", "prefix", "identities"}
    for condition in ("plain", "prefix"):
        assert set(ids[condition]) == {"mean", "max", "detection_rate"}
        assert ids[condition]["detection_rate"] == 1.0 and -1 <= ids[condition]["mean"] <= ids[condition]["max"] <= 1
    assert list(ids["identities"]) == EVAL_NAMES
    ada = ids["identities"]["Ada Quill"]
    assert (ada["reference_photos"], ada["reference_faces"]) == (2, 2)
    assert ada["plain"]["images"] == 2 and len(ada["plain"]["similarities"]) == 2
    assert ada["plain"]["mean"] == pytest.approx(np.mean(ada["plain"]["similarities"]))
    clip = report["clip_score"]
    assert clip["scale"] == 100 and set(clip) == {"scale", "identity", "generic"}
    assert set(clip["identity"]["prompts"]) == {f"A close-up portrait of {n}" for n in EVAL_NAMES}
    assert all(-100 <= clip[g][c] <= 100 for g in ("identity", "generic") for c in ("plain", "prefix"))
    # the CLIP score always reads the prompt as written, never the placeholder
    assert set(scored_texts) == {f"A close-up portrait of {n}" for n in EVAL_NAMES} | {"a red square on a blue background"}
    assert report["grids"] == ["grids/identity-00.png", "grids/generic-00.png"]
    for name in ("report.md", "id_scores.png", *report["grids"]):
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text()
    assert "| mean ID score |" in markdown and "| Bo Fenwick |" in markdown and "## CLIP score" in markdown
    grid = Image.open(out / "grids" / "identity-00.png")
    assert grid.size[1] == 16 + 4 * 128  # header, then plain and prefixed rows for 2 names, 32 px images x 4

    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 2 * 2 * 2 + 1 * 2 * 2  # (2 names + 1 prompt) x 2 images x 2 conditions
    plain, prefixed = (np.asarray(Image.open(out / "images/identity" / c / f"0000-A_close_up_portrait_of_Ada_Quill-{c}.png"))
                       for c in ("plain", "prefix"))
    assert np.abs(plain.astype(int) - prefixed).mean() > 1
    mtimes = {p: p.stat().st_mtime_ns for p in images}

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("--reuse sampled again")

    monkeypatch.setattr(evaluate, "Sampler", no_sampling)
    assert evaluate.main(args + ["--reuse"]) == 0
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    again = json.loads((out / "report.json").read_text())
    assert again["id_score"] == ids and again["clip_score"] == clip


def test_evaluate_input_errors(eval_inputs, tmp_path):
    (tmp_path / "refs" / "Ada Quill").mkdir(parents=True)
    (tmp_path / "refs" / "Ada Quill" / "0.png").write_bytes((eval_inputs / "refs/Ada Quill/0.png").read_bytes())
    partial = evaluate_args(eval_inputs, tmp_path / "x")
    partial[partial.index("--references") + 1] = str(tmp_path / "refs")
    with pytest.raises(UserError, match=r"no reference photos of 'Bo Fenwick': expected .*Bo Fenwick or .*Bo_Fenwick"):
        evaluate.main(partial)
    with pytest.raises(UserError, match=r"prompts file .*missing.txt does not exist"):
        evaluate.main(evaluate_args(eval_inputs, tmp_path / "x", "--prompts", str(tmp_path / "missing.txt")))
    with pytest.raises(UserError, match=r"CLIP model folder .*nowhere does not exist"):
        evaluate.main(evaluate_args(eval_inputs, tmp_path / "x", "--clip-model", str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="--num-images must be at least 1"):
        evaluate.main(evaluate_args(eval_inputs, tmp_path / "x", "--num-images", "0"))


def test_cli_prints_one_error_line(eval_inputs, tmp_path):
    args = evaluate_args(eval_inputs, tmp_path / "x")
    args[args.index("--references") + 1] = str(tmp_path / "no-refs")
    done = subprocess.run([sys.executable, "-m", "apl_jax.evaluate", *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: references folder {tmp_path / 'no-refs'} does not exist"
