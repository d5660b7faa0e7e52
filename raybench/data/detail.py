"""The `detail` mix: scenes where fine detail, reading and spatial relations decide the answer.

The default mix saturates (its best configs answer ~0.99), so it cannot tell fusion families
apart. These scenes keep its conventions (solid background, flat saturated objects, one
lowercase answer from a closed set) and ask more of the picture:

    color     "what color is the triangle in the middle?"      -> one of 10 colours
    shape     "what shape is pink?"                            -> circle / square / triangle
    position  "where is the cyan square?"                      -> one of 9 cells
    count     "how many shapes are there?"                     -> three .. six
    word      "what word is written?"                          -> 2-3 letters, e.g. "hkz"
    relation  "what color is the shape left of the red circle?" -> the neighbour's colour

An image is an invisible 3x3 grid with 3-6 objects, each small (7-17 px at 64 px), in its own
cell; 10 colours, some close at that size (orange / yellow, purple / blue). A word scene
writes 2-3 of the default mix's capitals in one row of the grid, that row empty otherwise:
1100 strings with no language to guess from (reading proper, the seeds' "OCR"). A relation
names an object and asks for the colour of the one in the adjacent cell in a direction.

What the vision tower pretrains on (a config's `scene` stage) stays the default mix's scenes:
the stand-in for a pretrained encoder, which the answer stage then asks these questions of.
"""

from __future__ import annotations

import random

__all__ = ["DETAIL_QTYPES", "DETAIL_COLORS", "detail_vocabulary", "detail_question", "sample_detail"]

from raybench.data.config import DETAIL_QTYPES
from raybench.data.synthetic import COLORS, GLYPHS, MORE_COLORS, SHAPES, Scene, SceneObject

DETAIL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **MORE_COLORS}
GRID = 3
CELLS: tuple[str, ...] = ("top-left", "top", "top-right", "left", "middle", "right",
                          "bottom-left", "bottom", "bottom-right")
COUNT_WORDS: tuple[str, ...] = ("three", "four", "five", "six")
MIN_OBJECTS, MAX_OBJECTS = 3, 6
# (question words, row step, column step): the neighbour "left of" a cell is one column less.
DIRECTIONS: tuple[tuple[str, int, int], ...] = (("left of", 0, -1), ("right of", 0, 1), ("above", -1, 0),
                                                ("below", 1, 0))


def detail_vocabulary() -> dict[str, list[str]]:
    """Each detail question type's answer set (the word's: every 2-3-letter string)."""
    letters = [g.lower() for g in GLYPHS]
    words = [a + b for a in letters for b in letters] + [a + b + c for a in letters for b in letters for c in letters]
    colors = list(DETAIL_COLORS)
    return {"color": colors, "shape": list(SHAPES), "position": list(CELLS), "count": list(COUNT_WORDS),
            "word": words, "relation": colors}


def _place(rng: random.Random, cell: int) -> tuple[float, float, float, float]:
    """A square box of side 0.35-0.8 of a cell, jittered but wholly inside it."""
    side = rng.uniform(0.35, 0.8) / GRID
    x0 = (cell % GRID) / GRID + rng.uniform(0.0, 1 / GRID - side)
    y0 = (cell // GRID) / GRID + rng.uniform(0.0, 1 / GRID - side)
    return (x0, y0, x0 + side, y0 + side)


def sample_detail_scene(rng: random.Random, with_word: bool) -> Scene:
    """3-6 objects of distinct colours in distinct cells; with a word, one row holds only it."""
    names = list(DETAIL_COLORS)
    background = rng.choice(names)
    free = list(range(GRID * GRID))
    word = center = None
    if with_word:
        row = rng.randrange(GRID)
        free = [c for c in free if c // GRID != row]
        word = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(2, 3)))
        center = (0.5 + rng.uniform(-0.08, 0.08), (row + 0.5) / GRID)
    n = rng.randint(MIN_OBJECTS, min(MAX_OBJECTS, len(free)))
    colors = rng.sample([c for c in names if c != background], n)
    objs = tuple(SceneObject(rng.choice(SHAPES), col, cell, _place(rng, cell))
                 for col, cell in zip(colors, rng.sample(free, n)))
    return Scene(background, objs, word=word, word_center=center)


def _neighbour(scene: Scene, obj: SceneObject, step: tuple[str, int, int]) -> SceneObject | None:
    _, dr, dc = step
    r, c = obj.cell // GRID + dr, obj.cell % GRID + dc
    if not (0 <= r < GRID and 0 <= c < GRID):
        return None
    return next((o for o in scene.objects if o.cell == r * GRID + c), None)


def detail_question(rng: random.Random, scene: Scene, qtype: str) -> tuple[str, str] | None:
    """A (question, answer) of `qtype` about `scene`, or None when it cannot be asked one."""
    objs = scene.objects
    if qtype == "word":
        return ("what word is written?", scene.word.lower()) if scene.word else None
    if qtype == "count":
        return "how many shapes are there?", COUNT_WORDS[len(objs) - MIN_OBJECTS]
    o = rng.choice(objs)
    if qtype == "shape":
        return f"what shape is {o.color}?", o.shape
    if qtype == "position":
        return f"where is the {o.color} {o.shape}?", CELLS[o.cell]
    if qtype == "color":  # the shape and its cell name it: shapes repeat among 3-6 objects
        return f"what color is the {o.shape} {_at(o.cell)}?", o.color
    if qtype == "relation":
        pairs = [(a, d, b) for a in objs for d in DIRECTIONS if (b := _neighbour(scene, a, d)) is not None]
        if not pairs:
            return None
        a, (words, _, _), b = rng.choice(pairs)
        return f"what color is the shape {words} the {a.color} {a.shape}?", b.color
    raise ValueError(f"unknown detail question type {qtype!r}; allowed: {', '.join(DETAIL_QTYPES)}")


def _at(cell: int) -> str:
    name = CELLS[cell]
    return "in the middle" if name == "middle" else f"on the {name}" if "-" not in name else f"at the {name}"


def sample_detail(rng: random.Random, qtype: str) -> tuple[Scene, str, str]:
    """A detail scene for one question type and its (question, answer): a word scene for a
    word question and for one in four of the others, so words are seen beside every type."""
    while True:
        scene = sample_detail_scene(rng, with_word=qtype == "word" or rng.random() < 0.25)
        if (qa := detail_question(rng, scene, qtype)) is not None:
            return (scene, *qa)
