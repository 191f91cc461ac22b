"""tfds builders for the two APL datasets, built from local folders into array_record files.

- identity_faces: face images, each of a person NAME (manifest, or `<Name>-<idx>.png` file names),
  with an optional anonymous attribute description per NAME.
- caption_pairs: ordinary images with captions (captions.jsonl, or the official prompts.txt).

Images are resized (shorter side) and centre-cropped to the resolution once, at build
time. The build lives in CACHE_DIR/<dataset>/<resolution>px_<fingerprint>/<version>; the
fingerprint covers every source file's sha256 and every label, so changed sources get
a new build instead of stale data. No TensorFlow needed: tfds writes array_record and
PIL encodes the PNGs; reading goes through the tfds data source (random access).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import PIL.Image
import PIL.ImageOps
import tensorflow_datasets as tfds
import yaml
from tqdm import tqdm

from apl_jax.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
CAPTION_FILES = ("captions.jsonl", "prompts.txt")
# PIL's ways of saying "this file is not a readable image".
UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
_THREADS = min(16, os.cpu_count() or 1)


class _DropTfdsNoise(logging.Filter):
    # tfds warns about every dynamic config, every first build and its PIL decoding fallback: all expected here.
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(("Using custom data configuration", "OpenCV is not installed", "Variant folder"))


logging.getLogger("absl").addFilter(_DropTfdsNoise())


@dataclasses.dataclass(frozen=True)
class SourceImage:
    file: str  # relative to the source folder, POSIX separators
    sha256: str
    labels: dict[str, str]  # the dataset's text features: name + attribute, or caption


# ---------------------------------------------------------------- source folders


def _existing_folder(folder: str | Path | None, key: str) -> Path:
    if not folder:
        raise UserError(f"{key} is not set")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}: folder {path} does not exist")
    return path


def _natural_key(name: str) -> list:
    # "2.png" before "10.png", as the official prompts.txt numbering expects.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _image_files(folder: Path) -> list[str]:
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise UserError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=_natural_key)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashed(folder: Path, labelled: list[tuple[str, dict[str, str]]]) -> list[SourceImage]:
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        hashes = pool.map(_sha256, [folder / file for file, _ in labelled])
        return [SourceImage(file, sha, labels) for (file, labels), sha in zip(labelled, hashes)]


def _check_listed(listed: Sequence[str], images: list[str], where: Path, what: str) -> None:
    """Every listed file exists and every image is listed: nothing is silently left out."""
    listed = set(listed)
    missing = sorted(listed - set(images))
    if missing:
        raise UserError(f"{where} names {missing[0]}, which does not exist in {where.parent}"
                        + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    unlisted = [f for f in images if f not in listed]
    if unlisted:
        raise UserError(f"{where} gives {what} for {len(listed)} of the {len(images)} images in {where.parent}; "
                        f"none for {unlisted[0]}" + (f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""))


def _string_mapping(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in value.items()):
        raise UserError(f"{where} must map strings to non-empty strings")
    return {k: v.strip() for k, v in value.items()}


def _read_manifest(folder: Path) -> tuple[Path | None, dict[str, Any]]:
    found = [folder / name for name in MANIFEST_NAMES if (folder / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{folder} has several manifests ({', '.join(p.name for p in found)}); keep one")
    if not found:
        return None, {}
    path = found[0]
    try:
        values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"manifest {path} cannot be parsed: {str(err).splitlines()[0]}") from None
    values = values or {}
    if not isinstance(values, dict) or set(values) - {"images", "attributes"}:
        raise UserError(f"manifest {path} must be a mapping with the keys images (file: NAME) and/or attributes (NAME: description)")
    return path, values


def _name_from_file(file: str) -> str:
    match = re.fullmatch(r"(.+)-\d+", Path(file).stem)
    if not match:
        raise UserError(f"identity image {file} is not named <Name>-<idx>{Path(file).suffix} and no manifest "
                        f"({' or '.join(MANIFEST_NAMES)}) says whose face it is")
    return match.group(1)


def scan_identity_folder(folder: str | Path | None, need_attributes: bool = False) -> list[SourceImage]:
    """The identity images of a folder with their NAME and attribute description (empty if none)."""
    folder = _existing_folder(folder, "data.identity_dir")
    images = _image_files(folder)
    manifest, values = _read_manifest(folder)
    attributes = _string_mapping(values.get("attributes") or {}, f"{manifest}: attributes")
    if "images" in values:
        names = _string_mapping(values["images"], f"{manifest}: images")
        _check_listed(list(names), images, manifest, "a NAME")
    else:
        names = {file: _name_from_file(file) for file in images}
    if need_attributes:
        missing = sorted(set(names.values()) - set(attributes))
        if missing:
            raise UserError(f"data.neutral_mode=attributes needs an attribute description for every NAME; "
                            f"{manifest or folder} has none for {missing[0]!r}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return _hashed(folder, [(file, {"name": name, "attribute": attributes.get(name, "")})
                            for file, name in sorted(names.items(), key=lambda item: _natural_key(item[0]))])


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not JSON: {err}") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("caption"), str) and entry["caption"].strip()):
            raise UserError(f'{path} line {number} must be {{"file": ..., "caption": ...}} with a non-empty caption')
        pairs.append((entry["file"], entry["caption"].strip()))
    return pairs


def _read_prompts_txt(path: Path, images: list[str]) -> list[tuple[str, str]]:
    """Official convention: `<idx> <caption>` lines, the idx order matching the sorted image files."""
    numbered = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        idx, _, caption = line.strip().partition(" ")
        if not idx.isdigit() or not caption.strip():
            raise UserError(f"{path} line {number} must be '<idx> <caption>', got {line.strip()[:60]!r}")
        if int(idx) in numbered:
            raise UserError(f"{path} line {number} repeats index {idx}")
        numbered[int(idx)] = caption.strip()
    if len(numbered) != len(images):
        raise UserError(f"{path} has {len(numbered)} captions for {len(images)} images in {path.parent}")
    return list(zip(images, (numbered[idx] for idx in sorted(numbered))))


def scan_caption_folder(folder: str | Path | None) -> list[SourceImage]:
    """The captioned images of a folder; an image may have several captions.jsonl lines."""
    folder = _existing_folder(folder, "data.caption_dir")
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(found) != 1:
        raise UserError(f"caption folder {folder} needs exactly one caption file, {' or '.join(CAPTION_FILES)}; "
                        f"found {len(found)}")
    images = _image_files(folder)
    if found[0].name == "prompts.txt":
        pairs = _read_prompts_txt(found[0], images)
    else:
        pairs = _read_jsonl(found[0])
        _check_listed([file for file, _ in pairs], images, found[0], "a caption")
    return _hashed(folder, [(file, {"caption": caption}) for file, caption in pairs])


# ---------------------------------------------------------------- builders


def fingerprint(items: list[SourceImage], resolution: int) -> str:
    """Changes whenever any source file, label or the resolution does."""
    content = json.dumps([resolution, [(i.file, i.sha256, i.labels) for i in items]], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    folder: str = ""
    resolution: int = 0
    items: tuple[SourceImage, ...] = ()


def _fitted_png(path: Path, resolution: int) -> bytes | None:
    """PNG of the image as RGB, shorter side scaled to resolution, centre-cropped square; None if unreadable."""
    try:
        with PIL.Image.open(path) as image:
            image = PIL.ImageOps.exif_transpose(image).convert("RGB")
            image = PIL.ImageOps.fit(image, (resolution, resolution), PIL.Image.Resampling.LANCZOS)
    except UNREADABLE:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset built from a scanned folder (FolderConfig); subclasses name their text features."""

    VERSION = tfds.core.Version("1.0.0")
    TEXT_FEATURES: tuple[str, ...] = ()
    # tfds looks for download checksums next to a builder's code, and that lookup imports
    # importlib_resources, which tfds 4.9.10 only installs on Python < 3.9. Local folders have none.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        features = {"image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                    "file": tfds.features.Text(), "sha256": tfds.features.Text()}
        features.update({name: tfds.features.Text() for name in self.TEXT_FEATURES})
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     metadata=tfds.core.MetadataDict(skipped=[]), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        folder, items = Path(config.folder), config.items
        skipped = self.info.metadata["skipped"]  # saved with the build, read back by load()
        bar = tqdm(total=len(items), unit="image", desc=f"building {self.name} ({config.resolution}px)",
                   dynamic_ncols=True)
        with bar, concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
            # Decode, fit and encode in threads, a chunk at a time: memory stays bounded however large the folder.
            for start in range(0, len(items), 8 * _THREADS):
                chunk = items[start : start + 8 * _THREADS]
                pngs = pool.map(lambda item: _fitted_png(folder / item.file, config.resolution), chunk)
                for key, (item, png) in enumerate(zip(chunk, pngs), start):
                    bar.update(1)
                    if png is None:
                        skipped.append(item.file)
                        continue
                    yield key, {"image": png, "file": item.file, "sha256": item.sha256, **item.labels}
        if len(skipped) == len(items):
            raise UserError(f"no readable image in {folder}: all {len(skipped)} are unreadable or corrupt")

    # tfds prints "Downloading and preparing dataset Unknown size ..." to stdout; say it our way.
    def _log_download_bytes(self) -> None:
        log.info("building %s from %s into %s", self.name, self.builder_config.folder, self.data_dir)

    def _log_download_done(self) -> None:
        pass


class IdentityFaces(_FolderBuilder, skip_registration=True):
    """Face images of named people (identity examples)."""

    TEXT_FEATURES = ("name", "attribute")


class CaptionPairs(_FolderBuilder, skip_registration=True):
    """Captioned ordinary images (generic examples)."""

    TEXT_FEATURES = ("caption",)


def load(builder_class: type[_FolderBuilder], folder: str | Path, items: list[SourceImage], resolution: int,
         cache_dir: str | Path) -> Sequence[dict[str, Any]]:
    """The built dataset of these scanned items (built now if absent), as a random-access tfds data source."""
    folder = Path(folder).expanduser().absolute()
    config = FolderConfig(name=f"{resolution}px_{fingerprint(items, resolution)}", folder=str(folder),
                          resolution=resolution, items=tuple(items))
    builder = builder_class(config=config, data_dir=str(Path(cache_dir).expanduser()), file_format="array_record")
    if not builder.is_prepared():
        tfds.disable_progress_bar()  # ours above counts the images; tfds' would add empty bars
        builder.download_and_prepare()
    # Read back from the build's metadata.json, so every run on this build says it, not only the first.
    skipped = builder.info.metadata["skipped"]
    if skipped:
        log.warning("%s: skipped %d unreadable or corrupt image(s) of %d in %s: %s", builder.name, len(skipped),
                    len(items), folder, ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    source = builder.as_data_source(split="train")
    log.info("%s: %d examples from %s in %s", builder.name, len(source), folder, builder.data_dir)
    return source
