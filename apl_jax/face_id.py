"""Face embedders and the ID score of the official test_id.py.

An embedder maps a uint8 RGB image [H, W, 3] to a unit vector for its largest face,
or None when it finds no face. Embedders (make_embedder spec):
- "dlib" (default): dlib's frontal face detector, its 5-point shape predictor,
  dlib.get_face_chip alignment and its ResNet face descriptor (128-d). The runtime
  is the PyPI package dlib-bin, the weights come from face-recognition-models.
- "arcface:PATH.onnx": an ArcFace model run by onnxruntime (e.g. insightface's
  w600k_r50.onnx). Faces are found by dlib's detector, its 68-point predictor gives
  the five ArcFace landmarks (eye centres, nose tip, mouth corners), and a
  similarity transform maps them onto the standard ArcFace 112x112 template.
- "fake": pixel statistics, no model. Only for tests: it recognises no one.

ID score (test_id.py): cosine between each image's embedding and NAME's reference;
per identity the mean and the max over the images with a detected face (0 when
there is none); both averaged over identities.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps

from apl_jax.errors import UserError

EVAL_EXTRA = "pip install -r requirements-eval.txt (dlib-bin, face-recognition-models, onnxruntime)"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_PHOTO_SIDE = 1024  # larger reference photos are shrunk first: detection cost grows with the pixel count
# insightface's arcface_dst: left eye, right eye, nose tip, left and right mouth corner (as seen) at 112 px
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float64
)


class FaceEmbedder(Protocol):
    name: str

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """A unit vector for the largest face of a uint8 RGB image, or None when there is no face."""


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


# ---------------------------------------------------------------- dlib and its model files

def _dlib():
    try:
        import dlib
    except ImportError:
        raise UserError(f"face embedding needs the [eval] extra: {EVAL_EXTRA}") from None
    return dlib


def dlib_model_file(name: str) -> str:
    # Found without importing face_recognition_models: its __init__ needs pkg_resources,
    # which recent setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dlib's face models come from face-recognition-models, the [eval] extra: {EVAL_EXTRA}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall face-recognition-models ({EVAL_EXTRA})")
    return str(path)


class _DlibFaces:
    """dlib's HOG frontal face detector plus a shape predictor; the largest face's landmarks."""

    def __init__(self, predictor_file: str):
        self.dlib = _dlib()
        self.detector = self.dlib.get_frontal_face_detector()
        self.predictor = self.dlib.shape_predictor(dlib_model_file(predictor_file))

    def landmarks(self, image: np.ndarray):
        image = np.ascontiguousarray(image)
        faces = self.detector(image, 1)  # one upsampling, as face_recognition does: finds faces down to ~40 px
        if not faces:
            return None
        return self.predictor(image, max(faces, key=lambda rect: rect.area()))


class DlibEmbedder:
    name = "dlib"

    def __init__(self):
        self.faces = _DlibFaces("shape_predictor_5_face_landmarks.dat")
        self.model = self.faces.dlib.face_recognition_model_v1(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        shape = self.faces.landmarks(image)
        if shape is None:
            return None
        # the chip size and padding the ResNet descriptor was trained on
        chip = self.faces.dlib.get_face_chip(np.ascontiguousarray(image), shape, size=150, padding=0.25)
        return unit(self.model.compute_face_descriptor(chip))


# ---------------------------------------------------------------- ArcFace (ONNX)

def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking source points to target (Umeyama)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    u, s, vt = np.linalg.svd(target_centred.T @ source_centred / len(source))
    signs = np.array([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])  # never a reflection
    rotation = u @ np.diag(signs) @ vt
    scale = (s * signs).sum() / source_centred.var(0).sum()
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def arcface_template(size: int) -> np.ndarray:
    """insightface's estimate_norm template for a size x size crop (112 or 128 multiples)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112)
    if size % 128 == 0:
        ratio = size / 128
        return (ARCFACE_TEMPLATE + [8.0, 0.0]) * ratio
    raise UserError(f"an ArcFace model's input must be a multiple of 112 or 128 pixels, this one takes {size}")


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """uint8 [size, size, 3]: the image warped so the five landmarks land on the ArcFace template.

    Landmarks count pixel centres as integers (as cv2.warpAffine, which insightface uses);
    PIL samples at +0.5, hence the half-pixel shifts.
    """
    forward = np.vstack([similarity_transform(landmarks, arcface_template(size)), [0, 0, 1]])
    inverse = np.linalg.inv(forward)
    linear, shift = inverse[:2, :2], inverse[:2, 2]
    shift = shift + 0.5 - linear @ [0.5, 0.5]
    coefficients = (*linear[0], shift[0], *linear[1], shift[1])
    warped = Image.fromarray(np.ascontiguousarray(image)).transform(
        (size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR
    )
    return np.asarray(warped)


class ArcFaceEmbedder:
    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"ArcFace model {model_path} does not exist "
                            "(insightface's buffalo_l.zip has one: w600k_r50.onnx)")
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"the ArcFace embedder needs onnxruntime, part of the [eval] extra: {EVAL_EXTRA}") from None
        self.name = f"arcface:{model_path.name}"
        self.faces = _DlibFaces("shape_predictor_68_face_landmarks.dat")
        try:
            self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable models
            raise UserError(f"{model_path} is not an ONNX model onnxruntime can load: {err}") from None
        model_input = self.session.get_inputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise UserError(f"{model_path} takes input {shape}; an ArcFace model takes [N, 3, S, S]")
        self.input_name, self.size = model_input.name, shape[2]

    def five_points(self, image: np.ndarray) -> np.ndarray | None:
        """[5, 2] ArcFace landmarks from dlib's 68 points, or None when there is no face."""
        shape = self.faces.landmarks(image)
        if shape is None:
            return None
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        # 36-41 and 42-47: the eyes as seen left and right; 30: nose tip; 48, 54: mouth corners
        return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        points = self.five_points(image)
        if points is None:
            return None
        face = align_face(image, points, self.size)
        # insightface's ArcFace input: RGB, NCHW, (x - 127.5) / 127.5
        batch = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return unit(self.session.run(None, {self.input_name: batch})[0][0])


class FakeEmbedder:
    """For tests: the 4x4 per-channel means, centred; a flat image counts as "no face". Recognises no one."""

    name = "fake"

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        cells = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((4, 4), Image.BOX), np.float64).ravel()
        centred = cells - cells.mean()
        return unit(centred) if np.linalg.norm(centred) > 1.0 else None


def make_embedder(spec: str) -> FaceEmbedder:
    if spec == "dlib":
        return DlibEmbedder()
    if spec.startswith("arcface:"):
        return ArcFaceEmbedder(spec.split(":", 1)[1])
    if spec == "fake":
        return FakeEmbedder()
    raise UserError(f"--embedder must be dlib, arcface:PATH.onnx or fake, got {spec!r}")


# ---------------------------------------------------------------- references

def load_photo(path: Path) -> np.ndarray:
    try:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except OSError as err:
        raise UserError(f"{path} is not a readable image: {err}") from None
    image.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    return np.asarray(image)


def reference_photos(folder: Path, name: str) -> list[Path]:
    """DIR/NAME/* (or DIR/NAME_with_underscores/*): the photos of one person."""
    candidates = [folder / name, folder / name.replace(" ", "_")]
    person = next((c for c in candidates if c.is_dir()), None)
    photos = sorted(p for p in person.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES) if person else []
    if not photos:
        raise UserError(f"no reference photos of {name!r}: expected {' or '.join(map(str, dict.fromkeys(candidates)))} "
                        f"with {'/'.join(PHOTO_SUFFIXES)} files")
    return photos


@dataclasses.dataclass
class Reference:
    embedding: np.ndarray  # unit vector: the normalised mean of the photos' embeddings
    photos: int
    faces: int


def reference_embedding(embedder: FaceEmbedder, photos: Sequence[Path], name: str) -> Reference:
    embeddings = [e for e in (embedder.embed(load_photo(p)) for p in photos) if e is not None]
    if not embeddings:
        raise UserError(f"no face found in any of the {len(photos)} reference photos of {name!r} ({photos[0].parent})")
    return Reference(unit(np.mean(embeddings, axis=0)), len(photos), len(embeddings))


# ---------------------------------------------------------------- ID score arithmetic

@dataclasses.dataclass
class IdentityScore:
    mean: float  # over the images with a face; 0 when none has one
    max: float
    faces: int
    images: int
    similarities: list[float]  # one per image with a face, in image order


def identity_score(embeddings: Sequence[np.ndarray | None], reference: np.ndarray) -> IdentityScore:
    similarities = [float(e @ reference) for e in embeddings if e is not None]
    if not similarities:
        return IdentityScore(0.0, 0.0, 0, len(embeddings), [])
    return IdentityScore(float(np.mean(similarities)), max(similarities), len(similarities), len(embeddings), similarities)


def summarise(scores: Sequence[IdentityScore]) -> dict[str, float]:
    """Averages over identities, and the share of all images that had a face."""
    images = sum(s.images for s in scores)
    return {
        "mean": float(np.mean([s.mean for s in scores])),
        "max": float(np.mean([s.max for s in scores])),
        "detection_rate": sum(s.faces for s in scores) / images if images else 0.0,
    }
