"""The `detail` mix (raybench/data/detail.py): every answer is what the scene shows."""

import random
import re

import pytest

from raybench.config import ConfigError, validate_config
from raybench.data.detail import CELLS, DETAIL_COLORS, DETAIL_QTYPES, DIRECTIONS, GRID, detail_vocabulary, sample_detail
from raybench.data.synthetic import chance_accuracy, generate, render_scene


def _scenes(qtype: str, n: int = 300):
    rng = random.Random(f"detail-test:{qtype}")
    return [sample_detail(rng, qtype) for _ in range(n)]


@pytest.mark.parametrize("qtype", DETAIL_QTYPES)
def test_every_answer_is_in_its_closed_set_and_the_scene_is_well_formed(qtype):
    vocab = detail_vocabulary()[qtype]
    for scene, question, answer in _scenes(qtype):
        assert answer in vocab, (question, answer)
        cells = [o.cell for o in scene.objects]
        colors = [o.color for o in scene.objects]
        assert 3 <= len(cells) <= 6 and len(set(cells)) == len(cells) and len(set(colors)) == len(colors)
        assert scene.background not in colors
        for o in scene.objects:  # wholly inside its own cell
            x0, y0, x1, y1 = o.box
            col, row = o.cell % GRID, o.cell // GRID
            assert col / GRID - 1e-9 <= x0 < x1 <= (col + 1) / GRID + 1e-9
            assert row / GRID - 1e-9 <= y0 < y1 <= (row + 1) / GRID + 1e-9
        if scene.word is not None:  # its row holds nothing else
            row = int(scene.word_center[1] * GRID)
            assert all(o.cell // GRID != row for o in scene.objects)
        if qtype == "count":
            assert answer == ("three", "four", "five", "six")[len(cells) - 3]
        if qtype == "word":
            assert answer == scene.word.lower() and 2 <= len(answer) <= 3


def test_a_relation_answers_with_the_neighbour_in_the_direction_asked():
    steps = {words: (dr, dc) for words, dr, dc in DIRECTIONS}
    for scene, question, answer in _scenes("relation"):
        m = re.fullmatch(r"what color is the shape (left of|right of|above|below) the (\w+) (\w+)\?", question)
        assert m, question
        ref = next(o for o in scene.objects if o.color == m[2])
        assert ref.shape == m[3]
        dr, dc = steps[m[1]]
        there = (ref.cell // GRID + dr) * GRID + ref.cell % GRID + dc
        assert 0 <= ref.cell % GRID + dc < GRID
        assert next(o for o in scene.objects if o.cell == there).color == answer


def test_a_colour_question_names_its_shape_and_cell():
    for scene, question, answer in _scenes("color"):
        obj = next(o for o in scene.objects if o.color == answer)
        assert obj.shape in question and CELLS[obj.cell].replace("-", " ") in question.replace("-", " ")


def test_detail_rows_are_seeded_prefix_stable_and_cover_the_mix():
    a = generate(60, 64, 3, "train", mix="detail", questions_per_image=3)
    b = generate(90, 64, 3, "train", mix="detail", questions_per_image=3)
    assert a.to_pydict() == b.slice(0, 60).to_pydict()
    val = generate(120, 64, 4, "val", mix="detail").to_pydict()
    assert sorted(set(val["qtype"])) == sorted(DETAIL_QTYPES)
    assert generate(12, 64, 4, "val", mix="detail", qtypes=["word"]).column("qtype").to_pylist() == ["word"] * 12


def test_a_word_is_drawn_in_ink_that_contrasts_with_the_background():
    scene, _, _ = _scenes("word", 1)[0]
    img = render_scene(scene, 64)
    bg = DETAIL_COLORS[scene.background]
    y = int(scene.word_center[1] * 64)
    band = [img.getpixel((x, yy)) for x in range(64) for yy in range(y - 4, y + 5)]
    far = [p for p in band if sum(abs(a - b) for a, b in zip(p, bg)) > 200]
    assert len(far) > 20  # the letters' strokes


def test_chance_is_per_mix():
    assert chance_accuracy("position", "detail") == pytest.approx(1 / 9)
    assert chance_accuracy("position") == pytest.approx(1 / 4)
    assert chance_accuracy("word", "detail") == pytest.approx(1 / 1100)
    assert chance_accuracy("relation", "detail") == pytest.approx(1 / 10)


def test_the_config_names_what_the_mix_cannot_do(tmp_path):
    cfg = validate_config({"name": "d", "run_dir": str(tmp_path), "data": {"mix": "detail"}})
    assert cfg.data_path == tmp_path / "data-detail"  # never the default mix's rendered data
    for bad, field in [({"data": {"mix": "hard"}}, "data.mix"),
                       ({"data": {"mix": "detail", "qtypes": ["glyph"]}}, "data.qtypes"),
                       ({"data": {"qtypes": ["word"]}}, "data.qtypes"),
                       ({"data": {"mix": "detail"}, "train": {"steps": 10, "stages": [
                           {"name": "a", "steps": 3, "data": {"num_examples": 64}}, {"name": "main"}]}},
                        "train.stages.0.data")]:
        with pytest.raises(ConfigError, match=re.escape(field)):
            validate_config({"name": "d", **bad})


def test_a_model_trains_on_the_detail_mix_after_a_scene_stage_of_default_scenes(tmp_path):
    from raybench.data.loader import read_split
    from raybench.train.local import train_local

    cfg = validate_config({
        "name": "d", "run_dir": str(tmp_path), "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"mix": "detail", "num_train": 64, "num_val": 24, "questions_per_image": 3},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 4, "eval_samples": 24, "warmup_steps": 1,
                  "stages": [{"name": "see", "steps": 2, "objective": "scene", "train": ["vision"],
                              "data": {"num_examples": 16}}, {"name": "main"}]}})
    metrics = train_local(cfg, log=lambda _: None)
    assert {k[4:] for k in metrics if k.startswith("acc/")} <= set(DETAIL_QTYPES)
    assert set(read_split(cfg.data_path, "train").column("qtype").to_pylist()) <= set(DETAIL_QTYPES)
    see = read_split(cfg.stage_path(cfg.train.stages[0]), "curriculum").column("answer").to_pylist()
    assert all(a.split(", ")[0].endswith(" background") for a in see)  # the default mix's captions
