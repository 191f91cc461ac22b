"""The APL-mini world: procedural faces of a cast of invented people, and coloured-shape scenes.

A person is a fixed combination of visible traits (Face); every render of them
jitters position, scale, lighting, background and clothes, so a person is
recognisable without being one fixed image. Renders are drawn with PIL at 4x and
box-filtered down to SIZE px, and are a pure function of (traits, seed).

Named people sit at least MIN_NAMED_DISTANCE salient traits apart; anonymous faces
at least MIN_ANON_DISTANCE from every named one, so "other" is a well-defined class.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor
_C = SIZE * _SS  # canvas size

# ---------------------------------------------------------------- traits

SEXES = ("woman", "man")
FACE_SHAPES = ("round", "oval", "square")
SKINS = {"pale": (250, 224, 205), "light": (235, 190, 150), "tan": (200, 145, 100), "brown": (140, 90, 55),
         "dark": (85, 55, 35)}
HAIR_COLOURS = {"black": (25, 22, 22), "brown": (110, 65, 30), "blonde": (235, 200, 90), "red": (200, 60, 25),
                "grey": (165, 165, 170)}
HAIR_STYLES = ("short", "long", "bald", "bun")
EYE_COLOURS = {"brown": (90, 50, 20), "blue": (40, 110, 230), "green": (40, 160, 60)}
# Scene vocabulary. Four of its words describe faces too (square: a face shape; red: a hair colour; blue,
# green: eye colours), as words of real captions mean more than one thing.
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (240, 140, 30)}

MIN_NAMED_DISTANCE = 3
MIN_ANON_DISTANCE = 2

# The look the model draws for a person it is given no name or trait of: the average of the anonymous faces
# (measured on the build of 2026-11-28: short hair in 0.80 of "A close-up portrait of a person", brown hair
# in 0.73, no glasses in 0.69). Identity here is nothing but traits, so a named person with this look is
# recognised in the anonymous face the prefix trains toward, where a real recogniser tells two people with
# the same hair apart; the cast keeps MIN_TYPICAL_DISTANCE of these traits away from it
# (docs/mini/build-2026-11-28/seeds.md).
TYPICAL_LOOK = {"hair_style": "short", "hair_colour": "brown", "glasses": False}
MIN_TYPICAL_DISTANCE = 2


@dataclasses.dataclass(frozen=True)
class Face:
    sex: str
    face_shape: str
    skin: str
    hair_colour: str
    hair_style: str
    eye_colour: str
    glasses: bool
    beard: bool

    # eye colour is two pixels wide at 32 px: drawn, but not counted as telling people apart
    SALIENT = ("sex", "face_shape", "skin", "hair_colour", "hair_style", "glasses", "beard")

    def visible(self, trait: str):
        if trait == "hair_colour" and self.hair_style == "bald" and not self.beard:
            return None  # only the eyebrows would show it
        return getattr(self, trait)

    def distance(self, other: "Face") -> int:
        return sum(self.visible(t) != other.visible(t) for t in self.SALIENT)

    def typical_distance(self) -> int:
        return sum(self.visible(t) != look for t, look in TYPICAL_LOOK.items())

    def described_traits(self) -> dict[str, str]:
        """The traits a manifest description names: sex, hair colour (unless bald) and skin."""
        hair = {} if self.hair_style == "bald" else {"hair_colour": self.hair_colour}
        return {"sex": self.sex, **hair, "skin": self.skin}

    def partial_description(self) -> str:
        """'a woman with red hair, dark skin': what a manifest says of a person (attributes mode).

        described_traits only, as a real description does not pin down a face: other cast members or
        anonymous faces share it (tests/test_mini.py checks that for every name)."""
        first = f"a bald {self.sex}" if self.hair_style == "bald" else f"a {self.sex} with {self.hair_colour} hair"
        return f"{first}, {self.skin} skin"

    def description(self, rng: np.random.Generator | None = None) -> str:
        """'a woman with red hair, long hair, wearing glasses, ...'; with rng, a random subset after the first clause."""
        hair = "a bald" if self.hair_style == "bald" else f"{self.hair_colour} hair"
        first = f"a bald {self.sex}" if self.hair_style == "bald" else f"a {self.sex} with {hair}"
        extra = [f"{self.skin} skin", f"{self.face_shape} face", f"{self.eye_colour} eyes"]
        if self.hair_style != "bald":
            extra.insert(0, "hair in a bun" if self.hair_style == "bun" else f"{self.hair_style} hair")
        if self.glasses:
            extra.insert(0, "wearing glasses")
        if self.beard:
            extra.insert(0, "with a beard")
        if rng is not None:
            extra = [e for e in extra if rng.random() < 0.5]
        return ", ".join([first, *extra])


def random_face(rng: np.random.Generator, sex: str | None = None) -> Face:
    sex = sex or SEXES[rng.integers(2)]
    return Face(sex=sex, face_shape=FACE_SHAPES[rng.integers(3)], skin=list(SKINS)[rng.integers(len(SKINS))],
                hair_colour=list(HAIR_COLOURS)[rng.integers(len(HAIR_COLOURS))],
                hair_style=HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=(0.35, 0.3, 0.1, 0.25))],
                eye_colour=list(EYE_COLOURS)[rng.integers(len(EYE_COLOURS))],
                glasses=bool(rng.random() < 0.35), beard=bool(sex == "man" and rng.random() < 0.5))


# ---------------------------------------------------------------- the cast

# Invented names, none meant to be a real person; women and men alternate (cast() relies on it).
TRAIN_NAMES = (
    "Orla Venhart", "Teodor Quillby", "Mira Castellane", "Jonas Pellwick", "Sabine Oakhurst", "Radu Fennimore",
    "Ines Calloway", "Bram Holtzer", "Livia Marchetti", "Oskar Thornbury", "Yara Delacourt", "Emil Brackwater",
    "Nadia Roswell", "Felix Ashgrove", "Talia Wendmere", "Hugo Larkspur",
)
HELDOUT_NAMES = (
    "Greta Vollmer", "Cyrus Pemberton", "Alma Trevisan", "Dario Kettleby", "Wren Halloway", "Milo Saxby",
    "Petra Lindqvist", "Anton Greywell",
)
NAMES = TRAIN_NAMES + HELDOUT_NAMES
OTHER = len(NAMES)  # the recognizer's "not one of the cast" class


@functools.lru_cache(maxsize=1)
def cast() -> dict[str, Face]:
    """NAME -> Face, seeded: each new person differs from all earlier ones in >= MIN_NAMED_DISTANCE traits,
    and from TYPICAL_LOOK in >= MIN_TYPICAL_DISTANCE."""
    rng = np.random.default_rng(20260526)
    faces: list[Face] = []
    while len(faces) < len(NAMES):
        face = random_face(rng, SEXES[len(faces) % 2])
        if face.typical_distance() >= MIN_TYPICAL_DISTANCE and all(face.distance(f) >= MIN_NAMED_DISTANCE for f in faces):
            faces.append(face)
    return dict(zip(NAMES, faces))


# Two more invented people, for apl-mini-db (the base fine-tuned few-shot on them, DreamBooth style):
# neither the base model nor APL training ever sees these names.
DREAMBOOTH_NAMES = ("Solveig Marrow", "Caspar Dunleigh")
# The traits the recognizer has a head for: a DreamBooth person has no identity class, so an image is
# theirs when every one of these reads as theirs.
RECOGNIZED_TRAITS = ("sex", "skin", "hair_colour", "hair_style", "glasses", "beard")


def recognized_distance(a: Face, b: Face) -> int:
    return sum(a.visible(t) != b.visible(t) for t in RECOGNIZED_TRAITS)


@functools.lru_cache(maxsize=1)
def dreambooth_cast() -> dict[str, Face]:
    """NAME -> Face for DREAMBOOTH_NAMES: MIN_NAMED_DISTANCE salient traits from the cast and each other,
    as the cast is, of which at least MIN_ANON_DISTANCE the recognizer reads (a woman can be no further
    from all 12 women of the cast), and MIN_TYPICAL_DISTANCE from the typical look. The seed is the first
    from 20261127 whose two people the shipped recognizer reads in at least 0.9 of 64 real renders: a
    person it cannot read cannot be measured. Chosen again for the 2026-12-07 recognizer, which read the
    2026-11-29 pair (seed 20261129) in 0.89 / 0.75; 20261156 is read in 0.94 / 0.94, and no earlier seed
    had both at 0.9."""
    rng = np.random.default_rng(20261156)
    faces = list(cast().values())
    for sex in SEXES[: len(DREAMBOOTH_NAMES)]:
        face = random_face(rng, sex)
        while face.typical_distance() < MIN_TYPICAL_DISTANCE or any(
                face.distance(f) < MIN_NAMED_DISTANCE or recognized_distance(face, f) < MIN_ANON_DISTANCE for f in faces):
            face = random_face(rng, sex)
        faces.append(face)
    return dict(zip(DREAMBOOTH_NAMES, faces[len(NAMES):]))


def anonymous_face(rng: np.random.Generator) -> Face:
    """A random face at least MIN_ANON_DISTANCE traits from every named person."""
    named = cast().values()
    while True:
        face = random_face(rng)
        if all(face.distance(f) >= MIN_ANON_DISTANCE for f in named):
            return face


# ---------------------------------------------------------------- rendering

@dataclasses.dataclass(frozen=True)
class Style:
    """How renders vary. The shifted style (apl-mini-ft's) has other lighting and backgrounds."""
    # +-15% light made neighbouring skins overlap (pale in dim light is light skin in bright); the base read the
    # skin a description named in 0.64 of its faces
    light_range: tuple[float, float] = (0.92, 1.08)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    striped_backgrounds: bool = False


PLAIN = Style()
SHIFTED = Style(light_range=(0.6, 0.9), tint=(1.1, 0.95, 0.8), striped_backgrounds=True)

_BACKGROUNDS = ((170, 190, 210), (200, 200, 190), (150, 170, 150), (210, 190, 200), (120, 130, 150),
                (230, 230, 230), (180, 160, 140))
_SHIRTS = ((60, 60, 120), (120, 40, 40), (40, 100, 60), (90, 90, 90), (200, 200, 210), (50, 50, 50))


def _shade(colour, factor):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, style: Style, colour=None) -> None:
    colour = colour or _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)
    draw.rectangle([0, 0, _C, _C], fill=colour)
    if style.striped_backgrounds:
        width = int(rng.integers(8, 20))
        for x in range(int(rng.integers(0, width)), _C, 2 * width):
            draw.rectangle([x, 0, x + width - 1, _C], fill=_shade(colour, 0.8))


def _finish(canvas: Image.Image, rng: np.random.Generator, style: Style) -> np.ndarray:
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    light = rng.uniform(*style.light_range)
    pixels = np.asarray(small, np.float32) * light * np.asarray(style.tint, np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_face(face: Face, seed, style: Style = PLAIN) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]; the same (face, seed, style) always gives the same pixels."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (_C, _C))
    draw = ImageDraw.Draw(canvas)
    _background(draw, rng, style)
    s = _SS * rng.uniform(0.9, 1.1)  # px per unit (the face is ~16 units tall)
    cx, cy = _C / 2 + _SS * rng.uniform(-2, 2), _C / 2 + _SS * rng.uniform(-1.5, 1.5)
    skin, hair = SKINS[face.skin], HAIR_COLOURS[face.hair_colour]

    def box(x0, y0, x1, y1):  # unit coordinates relative to the face centre
        return [cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s]

    # Sex shows in the build of the shoulders, a cue some latents wide: a woman's lips and a man's brows, a few
    # pixels, were not enough (the base drew the sex a description names in 0.60 of its faces, 0.67 with lips alone).
    brow = 0.6 if face.sex == "woman" else 1.4
    shoulders = box(-8.5, 10, 8.5, 24) if face.sex == "woman" else box(-14, 8.5, 14, 26)
    half_w = {"round": 7.0, "oval": 5.8, "square": 6.8}[face.face_shape]
    half_h = {"round": 7.0, "oval": 8.2, "square": 7.4}[face.face_shape]
    draw.ellipse(shoulders, fill=_SHIRTS[rng.integers(len(_SHIRTS))])
    if face.hair_style == "long":
        draw.rectangle(box(-half_w - 1.5, -half_h + 2, half_w + 1.5, half_h + 3), fill=hair)
    draw.rectangle(box(-2.2, half_h - 2, 2.2, half_h + 3), fill=_shade(skin, 0.9))  # neck
    if face.face_shape == "square":
        draw.rounded_rectangle(box(-half_w, -half_h, half_w, half_h), radius=2.5 * s, fill=skin)
    else:
        draw.ellipse(box(-half_w, -half_h, half_w, half_h), fill=skin)
    if face.hair_style in ("short", "long", "bun"):
        draw.chord(box(-half_w - 0.8, -half_h - 1.2, half_w + 0.8, half_h * 0.6), 180, 360, fill=hair)
    if face.hair_style == "bun":
        draw.ellipse(box(-3, -half_h - 5.5, 3, -half_h + 0.5), fill=hair)
    if face.beard:
        draw.chord(box(-half_w, -half_h * 0.2, half_w, half_h + 1.0), 0, 180, fill=hair)
        draw.ellipse(box(-2.5, 3.2, 2.5, 5.0), fill=skin)  # mouth gap
    for side in (-1, 1):
        ex = side * half_w * 0.42
        draw.ellipse(box(ex - 1.6, -1.3, ex + 1.6, 1.1), fill=(245, 245, 245))
        draw.ellipse(box(ex - 0.9, -0.9, ex + 0.9, 0.9), fill=EYE_COLOURS[face.eye_colour])
        draw.line(box(ex - 1.8, -2.6, ex + 1.8, -2.6), fill=_shade(hair, 0.9), width=max(1, int(brow * s)))
        if face.glasses:
            draw.ellipse(box(ex - 2.5, -2.2, ex + 2.5, 2.0), outline=(15, 15, 15), width=max(1, int(0.6 * s)))
    if face.glasses:
        draw.line(box(-half_w * 0.42 + 2.5, -0.6, half_w * 0.42 - 2.5, -0.6), fill=(15, 15, 15), width=max(1, int(0.5 * s)))
    draw.line(box(0, 0.5, 0, 2.5), fill=_shade(skin, 0.75), width=max(1, int(0.6 * s)))  # nose
    if face.sex == "woman":
        draw.ellipse(box(-2.4, 3.4, 2.4, 5.2), fill=(190, 30, 60))
    else:
        draw.ellipse(box(-2.0, 3.6, 2.0, 4.8), fill=_shade(skin, 0.6))
    return _finish(canvas, rng, style)


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str

    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def every_scene() -> list[Scene]:
    """The world's whole scene space: every shape, in every colour, on every other colour (4 x 6 x 5 = 120)."""
    return [Scene(shape, colour, background) for shape in SHAPES for colour in COLOURS for background in COLOURS
            if background != colour]


def random_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    colour, background = rng.choice(len(colours), 2, replace=False)
    return Scene(SHAPES[rng.integers(len(SHAPES))], colours[colour], colours[background])


def render_scene(scene: Scene, seed, style: Style = PLAIN) -> np.ndarray:
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (_C, _C))
    draw = ImageDraw.Draw(canvas)
    _background(draw, rng, style, COLOURS[scene.background])
    # Large and near the centre: at 8x8 latents a 7 px shape anywhere in the frame came out as a blob
    # of the right colour (shape right in 0.61 of samples); SD draws "a red circle" reliably.
    r = _SS * rng.uniform(8.5, 11)
    cx, cy = _C / 2 + _SS * rng.uniform(-2, 2), _C / 2 + _SS * rng.uniform(-2, 2)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.regular_polygon((cx, cy, r * 1.1), 4, rotation=float(rng.uniform(0, 10)), fill=fill)
    elif scene.shape == "triangle":
        draw.regular_polygon((cx, cy, r * 1.15), 3, rotation=float(rng.uniform(-8, 8)), fill=fill)
    else:
        angle = rng.uniform(0, np.pi)
        points = [(cx + (r if k % 2 == 0 else 0.45 * r) * np.cos(angle + k * np.pi / 5),
                   cy + (r if k % 2 == 0 else 0.45 * r) * np.sin(angle + k * np.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)
    return _finish(canvas, rng, style)


# ---------------------------------------------------------------- labelled samples

@dataclasses.dataclass(frozen=True)
class Sample:
    """One render and what is true of it; identity is NAMES' index, OTHER, or -1 for a scene."""
    image: np.ndarray
    identity: int
    face: Face | None
    scene: Scene | None


def sample(kind: str, rng: np.random.Generator, style: Style = PLAIN, names=NAMES) -> Sample:
    """kind: 'named' (a uniform choice from `names`), 'anonymous' or 'scene'."""
    seed = int(rng.integers(2**62))
    if kind == "named":
        name = names[rng.integers(len(names))]
        face = cast()[name]
        return Sample(render_face(face, seed, style), NAMES.index(name), face, None)
    if kind == "anonymous":
        face = anonymous_face(rng)
        return Sample(render_face(face, seed, style), OTHER, face, None)
    if kind == "scene":
        scene = random_scene(rng)
        return Sample(render_scene(scene, seed, style), -1, None, scene)
    raise ValueError(kind)


def mixture(rng: np.random.Generator, weights: dict[str, float], style: Style = PLAIN) -> Iterator[Sample]:
    kinds, p = list(weights), np.asarray(list(weights.values()), np.float64)
    while True:
        yield sample(kinds[rng.choice(len(kinds), p=p / p.sum())], rng, style)
