"""A procedural visual-question-answering set, rendered with Pillow.

Each image is a solid background split into an invisible 2x2 grid; every object sits
inside its own cell, so objects never overlap and "where is ...?" has exactly one
quadrant answer. Colours are distinct within an image and never equal the background,
so every question names something uniquely identifiable. Question types span coarse to
fine detail:

    background  "what color is the background?"      -> a colour   (large area)
    color       "what color is the square?"           -> a colour
    shape       "what shape is red?"                  -> a shape
    position    "where is the blue circle?"           -> top-left / top-right / ...
    count       "how many shapes are there?"          -> one .. four (objects can be small)
    glyph       "what letter is shown?"               -> a lowercase letter (drawn small)

Every answer is one lowercase word from a small closed set (`answer_vocabulary`).
Generation is deterministic: example `i` of a seed depends only on `(seed, i)`, so the
same seed gives byte-identical PNGs and `generate(n)` is a prefix of `generate(m > n)`.

The question-type names (`QTYPES`, `DESCRIBE`) live in `raybench.data.config`, where config
validation reads them without importing Pillow.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from raybench.data.config import ALL_QTYPES, DESCRIBE, QTYPES


# Saturated and far apart in RGB so that antialiased edges never read as another colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
# The `detail` mix's other four (raybench/data/detail.py): close to one another at a few pixels.
MORE_COLORS: dict[str, tuple[int, int, int]] = {
    "pink": (245, 120, 190),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
_RGB = {**COLORS, **MORE_COLORS}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Cell index -> answer word; cells are numbered row-major in the 2x2 grid.
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
# Capitals that stay distinct from each other at ~10 px (no O/Q/D, B/R/P, I/L, V/Y ...).
GLYPHS: tuple[str, ...] = ("A", "C", "E", "H", "K", "M", "S", "T", "X", "Z")

SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("qtype", pa.string()),
    ("split", pa.string()),
])

DESCRIBE_QUESTION = "describe the image."
_SUPERSAMPLE = 2  # draw at 2x and box-filter down: cheap antialiasing for small shapes
_MIN_IMAGE_SIZE = 8


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    cell: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1] image coordinates


@dataclass(frozen=True)
class Scene:
    """What an image shows; questions are asked about it and tests check answers against it."""

    background: str
    objects: tuple[SceneObject, ...] = ()
    glyph: str | None = None  # the capital letter drawn, if any
    glyph_cell: int | None = None
    glyph_center: tuple[float, float] | None = None  # in [0, 1] image coordinates
    word: str | None = None  # the `detail` mix: 2-3 capitals written in a row of their own
    word_center: tuple[float, float] | None = None


def answer_vocabulary() -> dict[str, list[str]]:
    """The closed answer set of every question type."""
    colors = list(COLORS)
    return {
        "color": colors,
        "shape": list(SHAPES),
        "position": list(POSITIONS),
        "count": list(COUNT_WORDS),
        "glyph": [g.lower() for g in GLYPHS],
        "background": colors,
    }


def chance_accuracy(qtype: str, mix: str = "default") -> float:
    """Accuracy of a uniform guess over the question type's answer set in `mix` (0 for a caption)."""
    if mix == "detail":
        from raybench.data.detail import detail_vocabulary

        return 1.0 / len(detail_vocabulary()[qtype])
    _check_qtypes([qtype])
    return 0.0 if qtype == DESCRIBE else 1.0 / len(answer_vocabulary()[qtype])


# The dense scene targets a caption holds: background colour; per quadrant a shape class
# (none, the shapes, each letter) and a colour class (none, the colours).
SCENE_CLASSES = (len(COLORS), 1 + len(SHAPES) + len(GLYPHS), 1 + len(COLORS))


def scene_targets(caption: str) -> list[int]:
    """A `describe` caption -> [background, shape x 4 quadrants, colour x 4] class ids; the
    inverse of `describe_scene` (a letter is a shape class of its own; its ink has no colour
    class: 0, like an empty cell)."""
    names, targets = list(COLORS), [0] * 9
    first, *things = caption.split(", ")
    targets[0] = names.index(first.removesuffix(" background"))
    for thing in things:
        words = thing.split(" ")
        cell = POSITIONS.index(words[-1])
        if words[0] == "letter":
            targets[1 + cell] = 1 + len(SHAPES) + GLYPHS.index(words[1].upper())
        else:
            targets[1 + cell] = 1 + SHAPES.index(words[1])
            targets[5 + cell] = 1 + names.index(words[0])
    return targets


def describe_scene(scene: Scene) -> str:
    """The scene as one caption, objects in reading order (cells row-major), e.g.
    "green background, red circle top-left, letter k bottom-right"."""
    parts = [f"{scene.background} background"]
    things = [(o.cell, f"{o.color} {o.shape} {POSITIONS[o.cell]}") for o in scene.objects]
    if scene.glyph is not None and scene.glyph_cell is not None:
        things.append((scene.glyph_cell, f"letter {scene.glyph.lower()} {POSITIONS[scene.glyph_cell]}"))
    return ", ".join(parts + [text for _, text in sorted(things)])


def _check_qtypes(qtypes: Sequence[str]) -> list[str]:
    if isinstance(qtypes, str):  # a bare string would iterate as letters
        qtypes = [qtypes]
    bad = [q for q in qtypes if q not in ALL_QTYPES]
    if bad:
        raise ValueError(f"unknown question type(s) {bad}; allowed: {', '.join(ALL_QTYPES)}")
    out = list(dict.fromkeys(qtypes))
    if not out:
        raise ValueError(f"no question types requested; allowed: {', '.join(ALL_QTYPES)}")
    return out


# ----------------------------------------------------------------------------- scenes


def _place(rng: random.Random, cell: int, lo: float, hi: float) -> tuple[float, float, float, float]:
    """A square box of side in [lo, hi] of a cell, jittered but wholly inside that cell."""
    side = rng.uniform(lo, hi) * 0.5  # a cell is half the image wide
    cx0, cy0 = (cell % 2) * 0.5, (cell // 2) * 0.5
    margin = 0.02
    x0 = cx0 + margin + rng.uniform(0.0, 0.5 - 2 * margin - side)
    y0 = cy0 + margin + rng.uniform(0.0, 0.5 - 2 * margin - side)
    return (x0, y0, x0 + side, y0 + side)


def sample_scene(rng: random.Random, qtype: str, max_objects: int = 4,
                 letter_share: float | None = None) -> tuple[Scene, str, str]:
    """A scene for one question type and its (question, answer).

    `max_objects` (1..4) caps the things drawn (shapes, and the letter with its distractors):
    1-object scenes are a curriculum's easy start, where no question needs binding.
    `letter_share`: how many `describe` scenes hold a letter (None: as often as the question
    mix asks about letters, one in six).
    """
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects = {max_objects}: must be 1..4 (one object per grid cell)")
    names = list(COLORS)
    # A caption describes letter scenes too, as often as the question mix draws them.
    share = 1 / len(QTYPES) if letter_share is None else letter_share
    if qtype == "glyph" or (qtype == DESCRIBE and rng.random() < share):
        # One letter in one cell, up to two shapes elsewhere as distractors.
        background = rng.choice(names)
        cells = rng.sample(range(4), 1 + rng.randint(0, min(2, max_objects - 1)))
        colors = rng.sample([c for c in names if c != background], len(cells) - 1)
        objs = tuple(SceneObject(rng.choice(SHAPES), col, cell, _place(rng, cell, 0.35, 0.8))
                     for cell, col in zip(cells[1:], colors))
        letter = rng.choice(GLYPHS)
        gcell = cells[0]
        center = ((gcell % 2) * 0.5 + rng.uniform(0.2, 0.3), (gcell // 2) * 0.5 + rng.uniform(0.2, 0.3))
        scene = Scene(background, objs, letter, gcell, center)
        if qtype == DESCRIBE:
            return scene, DESCRIBE_QUESTION, describe_scene(scene)
        return scene, "what letter is shown?", letter.lower()

    n = rng.randint(1, max_objects)
    background = rng.choice(names)
    colors = rng.sample([c for c in names if c != background], n)
    cells = rng.sample(range(4), n)
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    target = rng.randrange(n)  # the object a color/shape/position question is about
    if qtype == "color":
        # "the square" must be unique: the others take the remaining two shapes only.
        others = [s for s in SHAPES if s != shapes[target]]
        shapes = [s if i == target else rng.choice(others) for i, s in enumerate(shapes)]
    # Small objects matter most for counting; every type sees the same size range.
    objs = tuple(SceneObject(s, c, cell, _place(rng, cell, 0.3, 0.85))
                 for s, c, cell in zip(shapes, colors, cells))
    scene = Scene(background, objs)

    if qtype == "background":
        return scene, "what color is the background?", background
    if qtype == "count":
        return scene, "how many shapes are there?", COUNT_WORDS[n - 1]
    if qtype == DESCRIBE:
        return scene, DESCRIBE_QUESTION, describe_scene(scene)
    obj = objs[target]
    if qtype == "color":
        return scene, f"what color is the {obj.shape}?", obj.color
    if qtype == "shape":
        return scene, f"what shape is {obj.color}?", obj.shape
    if qtype == "position":
        return scene, f"where is the {obj.color} {obj.shape}?", POSITIONS[obj.cell]
    raise ValueError(f"unknown question type {qtype!r}; allowed: {', '.join(QTYPES)}")


# ---------------------------------------------------------------------------- render


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1: a scalable built-in font (Aileron, embedded), no font file on disk.
    return ImageFont.load_default(size=size)


def glyph_font_size(image_size: int) -> int:
    """Small but legible: a quarter of the image (cap height about a sixth)."""
    return max(6, round(image_size / 4))


def word_font_size(image_size: int) -> int:
    """A `detail` word: its letters the size of the default mix's glyph, which a `scene` stage
    teaches the tower (at a fifth of the image, nothing read a single letter after the answer
    stage); three of them take about half the image's width."""
    return glyph_font_size(image_size)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB image of image_size x image_size."""
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _RGB[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * big for v in obj.box)
        fill = _RGB[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    # Black or white, whichever contrasts with the background, so every letter is legible.
    r, g, b = _RGB[scene.background]
    ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
    for text, center, size in ((scene.glyph, scene.glyph_center, glyph_font_size(image_size)),
                               (scene.word, scene.word_center, word_font_size(image_size))):
        if text is not None and center is not None:
            # anchor="mm" centres the ink box (not the line box) on the point.
            draw.text((center[0] * big, center[1] * big), text, fill=ink, font=_font(size * _SUPERSAMPLE), anchor="mm")
    return img.reduce(_SUPERSAMPLE)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed settings (no optimize pass) give byte-identical output for a given Pillow/zlib;
    # level 3 takes half the time of the default 6 for files ~15% larger.
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _example_rng(seed: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and
    # independent of PYTHONHASHSEED; one stream per example keeps prefixes stable.
    return random.Random(f"raybench-synthetic:{seed}:{index}")


def make_example(seed: int, index: int, image_size: int, qtype: str,
                 max_objects: int = 4) -> tuple[bytes, str, str, Scene]:
    """Example `index` of `seed`: (png, question, answer, scene)."""
    scene, question, answer = sample_scene(_example_rng(seed, index), qtype, max_objects)
    return _png(render_scene(scene, image_size)), question, answer, scene


def _question_about(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str] | None:
    """A (question, answer) of `qtype` about `scene`, or None when the scene cannot be asked
    one: a glyph scene is never asked to count (no validation count scene holds a letter), and
    a colour question names a shape that only one of the objects has, as in `sample_scene`."""
    objs = scene.objects
    if qtype == DESCRIBE:
        return DESCRIBE_QUESTION, describe_scene(scene)
    if qtype == "background":
        return "what color is the background?", scene.background
    if qtype == "count":
        return ("how many shapes are there?", COUNT_WORDS[len(objs) - 1]) if objs and scene.glyph is None else None
    if qtype == "color":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        return (f"what color is the {(o := rng.choice(unique)).shape}?", o.color) if unique else None
    if not objs:  # shape / position need an object; glyph only its own scene
        return None
    o = rng.choice(objs)
    if qtype == "shape":
        return f"what shape is {o.color}?", o.shape
    if qtype == "position":
        return f"where is the {o.color} {o.shape}?", POSITIONS[o.cell]
    return None


def scene_questions(rng: random.Random, scene: Scene, kinds: Sequence[str], k: int, ask=None
                    ) -> list[tuple[str, str, str]]:
    """Up to `k` (qtype, question, answer) about `scene`, of distinct types from `kinds`,
    chosen with `rng`; `ask(rng, scene, qtype)` words one (default: the default mix's)."""
    ask = ask or _question_about
    out = []
    for qtype in rng.sample(list(kinds), len(kinds)):
        if len(out) == k:
            break
        if (qa := ask(rng, scene, qtype)) is not None:
            out.append((qtype, *qa))
    return out


def make_group(seed: int, index: int, image_size: int, qtype: str, k: int, max_objects: int = 4,
               kinds: Sequence[str] = QTYPES, letter_share: float | None = None, mix: str = "default"
               ) -> tuple[bytes, list[tuple[str, str, str]]]:
    """Example `index` asked up to `k` questions: (png, [(qtype, question, answer), ...]).
    The first is `make_example`'s own question; the rest come from the same random stream."""
    rng = _example_rng(seed, index)
    others = [q for q in kinds if q != qtype]
    if mix == "detail":
        from raybench.data.detail import detail_question, sample_detail

        scene, question, answer = sample_detail(rng, qtype)
        rest = scene_questions(rng, scene, others, k - 1, ask=detail_question)
    else:
        scene, question, answer = sample_scene(rng, qtype, max_objects, letter_share)
        rest = scene_questions(rng, scene, others, k - 1)
    return _png(render_scene(scene, image_size)), [(qtype, question, answer)] + rest


def mix_qtypes(mix: str, qtypes: Sequence[str] | None = None) -> list[str]:
    """The question types asked in `mix` (`qtypes`, checked against the mix, or all of its own)."""
    if mix == "detail":
        from raybench.data.detail import DETAIL_QTYPES

        kinds = list(DETAIL_QTYPES if qtypes is None else dict.fromkeys(qtypes))
        bad = [q for q in kinds if q not in DETAIL_QTYPES]
        if bad or not kinds:
            raise ValueError(f"detail question type(s) {bad or kinds}: allowed {', '.join(DETAIL_QTYPES)}")
        return kinds
    if mix != "default":
        raise ValueError(f"unknown data mix {mix!r}; allowed: default, detail")
    return _check_qtypes(QTYPES if qtypes is None else qtypes)


def generate(num_examples: int, image_size: int, seed: int, split: str,
             qtypes: Sequence[str] | None = None, max_objects: int = 4,
             questions_per_image: int = 1, letter_share: float | None = None, mix: str = "default") -> pa.Table:
    """`num_examples` rows (image, question, answer, qtype, split); the images' qtypes cycle
    in order. With `questions_per_image` k > 1 each image is asked up to k questions about
    the same scene, in consecutive rows that share its PNG bytes (trainers encode it once).
    `mix`: the default scenes, or the `detail` mix's (raybench/data/detail.py)."""
    kinds = mix_qtypes(mix, qtypes)
    if num_examples < 0:
        raise ValueError(f"num_examples = {num_examples}: must be >= 0")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size = {image_size}: must be >= {_MIN_IMAGE_SIZE}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image = {questions_per_image}: must be >= 1")
    images, questions, answers, types = [], [], [], []
    i = 0
    while len(questions) < num_examples:
        png, group = make_group(seed, i, image_size, kinds[i % len(kinds)], questions_per_image,
                                max_objects, kinds, letter_share, mix)
        for qt, q, a in group[: num_examples - len(questions)]:
            images.append(png)
            questions.append(q)
            answers.append(a)
            types.append(qt)
        i += 1
    return pa.table([images, questions, answers, types, [split] * num_examples], schema=SCHEMA)


def derived_seed(seed: int, split: str) -> int:
    """A seed for another split, so that its images are not the train images."""
    digest = hashlib.sha256(f"{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def write_synthetic(out_dir: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                    seed: int, qtypes: Sequence[str] | None = None, questions_per_image: int = 1,
                    mix: str = "default") -> Path:
    """Write out_dir/train.parquet (seed) and out_dir/val.parquet (a derived seed; one
    question per image, whatever `questions_per_image` the training rows have)."""
    return _write_tables(out_dir, {
        "train": generate(num_train, image_size, seed, "train", qtypes,
                          questions_per_image=questions_per_image, mix=mix),
        "val": generate(num_val, image_size, derived_seed(seed, "val"), "val", qtypes, mix=mix),
    })


def write_curriculum(out_dir: str | os.PathLike, num_examples: int, image_size: int, seed: int,
                     qtypes: Sequence[str] | None = None, max_objects: int = 1,
                     questions_per_image: int = 1, name: str = "curriculum",
                     letter_share: float | None = None) -> Path:
    """Write out_dir/curriculum.parquet: a training stage's own scenes (at most `max_objects`
    things) with split "curriculum", from a seed derived from the data seed and the stage's
    `name` (so none is a training image, and two stages draw different scenes)."""
    salt = "curriculum" if name == "curriculum" else f"curriculum:{name}"
    return _write_tables(out_dir, {"curriculum": generate(
        num_examples, image_size, derived_seed(seed, salt), "curriculum", qtypes, max_objects,
        questions_per_image, letter_share)})


def _write_tables(out_dir: str | os.PathLike, tables: dict[str, pa.Table]) -> Path:
    out = Path(out_dir).expanduser()
    # Build in a hidden sibling and rename, so an interrupted run never leaves a directory
    # that looks complete (callers synthesise only when the directory is missing).
    fresh = not out.exists()
    target = out.parent / f".{out.name}.tmp-{os.getpid()}" if fresh else out
    target.mkdir(parents=True, exist_ok=True)
    try:
        for name, table in tables.items():
            tmp = target / f".{name}.parquet.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, target / f"{name}.parquet")
        if fresh:
            os.replace(target, out)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out
